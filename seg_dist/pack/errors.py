"""The packer's one exception type: a problem the user can fix."""

from __future__ import annotations

from collections.abc import Sequence

from seg_dist.errors import UserError

__all__ = ["PackError", "Problem"]

# (path or option, what is wrong with it): one line of a validation report.
Problem = tuple[str, str]


class PackError(UserError):
    """Bad input or a refused pack; `seg_dist.cli.run` prints it as one line, exit code 2.

    `problems` holds the per-file findings behind a refused pack (empty otherwise), so callers can report
    them before the one-line summary.
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)
