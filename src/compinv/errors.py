"""The one exception type users see: its message names the bad input and the fix.

Library code names an input by its Python argument name in backticks (`images`, `runs`), so
the same error reads right in both worlds: `str(error)` shows the Python name (a Python user
passed `images=`), and the CLI shows the flag (`--images`) through `options.flag_for`, the one
place where argument names become flag names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ARGUMENT = re.compile(r"`([a-z_][a-z0-9_]*)`")


class CompinvError(Exception):
    """A bad input or an unrecoverable state, reported as one clear line by the CLI."""

    def __init__(self, message: str):
        super().__init__(message)
        self.template = message

    def __str__(self) -> str:
        return self.render(lambda name: name)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every `argument` written as `name(argument)` returns."""
        return _ARGUMENT.sub(lambda m: name(m.group(1)), self.template)
