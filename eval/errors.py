"""The one user-facing error type: bad input or an impossible request, printed by every CLI as one line, exit 2.

Lives at the bottom layer so every library module can raise it without importing a CLI module.
"""
from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
