"""The one exception type for user mistakes.

Anything the user can fix (a bad path, a wrong shape, an unknown recipe, a corrupt
checkpoint) is raised as `UserError`; the CLI prints its message as one line and exits
non-zero. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 1


class ConfigError(UserError):
    """Unknown config key, group option or bad value: usage error, exit code 2."""

    exit_code = 2
