"""Who may join a bus by themselves: a bus's `users` attribute.

Root writes user and group names (or numeric ids) to buses/BUS/users, one per line or
separated by spaces or commas; a group is written `@GROUP`. A process whose uid, or
one of whose groups (as the kernel recorded them at connect time), is listed may ask
the gate to admit it (`{"op": "join"}`): `alacrity bus exec` and `alacrity vm run`
without sudo. Root may always join. Names are resolved to ids when root writes them,
so the gate never asks NSS (which may be a network service) while it serves peers.
"""

from __future__ import annotations

import grp
import pwd
import re

from alacrity import ids
from alacrity.errors import invalid

#: (kind, id, name): kind is "user" or "group".
Entry = tuple[str, int, str]
MAX_ENTRIES = 64
MAX_ID = 0xFFFFFFFE


def parse(text: str, attr_path: str) -> list[Entry]:
    """The entries `text` lists, each resolved; AdminError (EINVAL) naming the first bad one."""
    words = [w for w in re.split(r"[\s,]+", text) if w]
    if len(words) > MAX_ENTRIES:
        raise invalid(f"{attr_path}: at most {MAX_ENTRIES} users and groups")
    entries: list[Entry] = []
    for word in words:
        group = word.startswith("@")
        name = word[1:] if group else word
        kind = "group" if group else "user"
        if not name.isascii() or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?", name):
            raise invalid(f"{attr_path}: {word!r} is not a {kind} name or id "
                          "(write NAME, UID, @GROUP or @GID)")
        ident = _resolve(kind, name, attr_path)
        if ident == 0:
            raise invalid(f"{attr_path}: {word!r} is root's; root may always join, so leave it out")
        start, count = ids.unprivileged.start, ids.unprivileged.count
        if start <= ident < start + count:
            raise invalid(f"{attr_path}: {word!r} is in alacrityd's unprivileged id range "
                          f"({start}:{count}), whose ids belong to jailed guests and switches")
        entries.append((kind, ident, name))
    return entries


def _resolve(kind: str, name: str, attr_path: str) -> int:
    if name.isdigit():
        ident = int(name)
        if ident > MAX_ID:
            raise invalid(f"{attr_path}: {kind} id {name} is out of range")
        return ident
    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        raise invalid(f"{attr_path}: no {kind} named {name!r} on this host") from None


def render(entries: list[Entry]) -> str:
    return "".join(f"{'@' if kind == 'group' else ''}{name}\n" for kind, _, name in entries)


def allows(entries: list[Entry], uid: int, gids: tuple[int, ...]) -> bool:
    return any((kind == "user" and ident == uid) or (kind == "group" and ident in gids)
               for kind, ident, _ in entries)
