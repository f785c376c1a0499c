"""The errors a user can cause, at the bottom of the import graph (this module imports nothing).

Every script catches `UserError`, prints its message (one line that says what was wrong and how
to fix it) and exits non-zero instead of showing a traceback."""


class UserError(Exception):
    """Bad input from the user: a setting, data, a checkpoint or a path."""


class ConfigError(UserError, ValueError):
    """A bad config value."""


class DataError(UserError):
    """A dataset that is missing or cannot be read."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or refused."""


class BitstreamError(UserError, ValueError):
    """A byte string that is not what model.compress wrote (truncated, corrupted or foreign)."""
