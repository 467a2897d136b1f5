"""The two kinds of failure a command reports as one line instead of a traceback (see `cli.run`).

Anything else that escapes a command is a bug and keeps its traceback: internal contract checks raise
ValueError, TypeError or RuntimeError, which `cli.run` does not catch.
"""


class UserError(Exception):
    """Bad input the user can fix: an argument, a config key, a data file, a checkpoint, a device; exit 2.

    The message is one line that names the key or file, what is wrong with it and the valid range or the
    fix. Not a ValueError, so that a library bug raising ValueError is never mistaken for bad input.
    """


class RunFailed(RuntimeError):
    """The run started but cannot go on (e.g. it diverged); exit 1."""
