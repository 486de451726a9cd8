"""The one exception type users see: its message names the bad input and the fix."""


class CompinvError(Exception):
    """A bad input or an unrecoverable state, reported as one clear line by the CLI."""
