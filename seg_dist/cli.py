"""What every command shares: `seg-dist <command>`, and known errors turned into one line and an exit code.

Each command is a thin module (`python -m seg_dist.<command>` runs the same `main`); the library does
the work and raises. Here a user error (bad input, bad config, missing file) becomes
`error: <path>: <what is wrong>` and exit 2, a run that went wrong (e.g. diverged) exit 1, and a
stop request honoured with a checkpoint exit 0. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .atomic import DiskFull
from .errors import RunFailed, UserError

__all__ = ["COMMANDS", "RunFailed", "UserError", "main", "report", "run"]

EXIT_OK = 0
EXIT_FAILED = 1  # the run itself went wrong (diverged, validation saw the wrong sample count, ...)
EXIT_USAGE = 2  # bad input: arguments, config, data files

# `seg-dist <name>` -> the module whose `main(argv) -> int` runs it (also `python -m <module>`).
COMMANDS = {
    "pack": ("seg_dist.pack.__main__", "files -> WebDataset shards, validated"),
    "synth": ("seg_dist.synth", "write the procedural example dataset as image and mask files"),
    "preview": ("seg_dist.preview", "a PNG grid of augmented training samples"),
    "train": ("seg_dist.train", "train (torchrun -m seg_dist.train for several processes)"),
    "evaluate": ("seg_dist.evaluate", "exact metrics of a checkpoint on a split, per class"),
    "predict": ("seg_dist.predict", "masks and overlays for image files, at their own size"),
    "export": ("seg_dist.export", "a checkpoint as TorchScript or ONNX, checked against the eager model"),
}


def report(message: str) -> None:
    """One line on stderr, or through logging (rank prefix) where a command has set it up."""
    from .runlog import HANDLER_NAME

    if any(h.get_name() == HANDLER_NAME for h in logging.getLogger().handlers):
        logging.getLogger("seg_dist").error("%s", message)
    else:
        print(f"error: {message}", file=sys.stderr)


def run(command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call `command(argv)`; known errors become one line and an exit code instead of a traceback.

    Only `UserError` (exit 2) and `RunFailed`/`DiskFull` (exit 1) are known: any other exception, a
    ValueError or a missing file included, is a bug in seg_dist and propagates with its traceback.
    SEG_DIST_TRACEBACK=1 re-raises the known ones too, for debugging. The logging a command sets up ends
    with it, so one process can run several commands (notebooks, tests) without one writing through
    another's handlers.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return command(argv)
    except UserError as e:
        if os.environ.get("SEG_DIST_TRACEBACK"):
            raise
        report(str(e))
        return EXIT_USAGE
    except (RunFailed, DiskFull) as e:
        if os.environ.get("SEG_DIST_TRACEBACK"):
            raise
        report(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        report("interrupted")
        return 130
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """`seg-dist <command> [args]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
        print("usage: seg-dist <command> [arguments]   (seg-dist <command> --help for its arguments)\n\ncommands:")
        print("\n".join(lines))
        if args and args[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {args[0]!r}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if args else EXIT_USAGE
    module = importlib.import_module(COMMANDS[args[0]][0])
    return module.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
