"""Errors that carry an errno, so the admin tree and the CLI can report them precisely."""

from __future__ import annotations

import errno as _errno


class AdminError(Exception):
    """A refused administrative action: `errno` goes back to the filesystem caller,
    `message` goes to the daemon's log and to CLI users."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, self.errno)}: {self.message}"


def invalid(message: str) -> AdminError:
    return AdminError(_errno.EINVAL, message)


def busy(message: str) -> AdminError:
    return AdminError(_errno.EBUSY, message)


def not_found(message: str) -> AdminError:
    return AdminError(_errno.ENOENT, message)
