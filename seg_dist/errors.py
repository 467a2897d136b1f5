"""The two kinds of failure a command reports as one line instead of a traceback (see `cli.run`)."""


class UserError(ValueError):
    """Bad input the user can fix (arguments, config, data files); exit 2. A ValueError, so library
    code that raises ValueError for bad input is reported the same way."""


class RunFailed(RuntimeError):
    """The run started but cannot go on (e.g. it diverged); exit 1."""
