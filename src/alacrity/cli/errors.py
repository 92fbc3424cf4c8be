"""The one error every subcommand may raise."""


class UserError(Exception):
    """A one-line error for the user, saying what to do; exit status 2."""
