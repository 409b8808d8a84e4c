"""Errors a user can fix.

Every error raised for bad input derives from :class:`UserError`. The CLI prints its
message on one line (no traceback) and exits with code 2; library callers catch it
like any other exception. A message names the problem and the way out.
"""


class UserError(Exception):
    """Bad input: a flag value, a file, a folder. The message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A recipe or run option is out of range or inconsistent."""


class DataError(UserError):
    """A dataset is unknown, missing, corrupt or malformed."""
