"""Train a segmentation model with DDP on WebDataset shards.

    torchrun --nproc_per_node=8 -m seg_dist.train --config configs/voc_unet_8gpu.yaml [key=value ...]
    python -m seg_dist.train --config configs/default.yaml          # one process, same code
    seg-dist train --config configs/default.yaml

The command: arguments, config, signals and the process group. The loop is `seg_dist.trainer`.
Exit 0 when the run finished or stopped on request with a checkpoint (a launcher may requeue it),
1 when it failed (e.g. diverged), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli, distributed
from .config import load_config
from .runlog import setup_logging
from .trainer import train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=5 model.width=32")
    return p.parse_args(argv)


def _train(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    stop = distributed.StopRequest()
    stop.install()
    with distributed.setup(cfg.train.device) as (denv, device):
        setup_logging(denv.rank)
        distributed.share_cpu_threads(denv, device)
        train(cfg, denv, device, stop)
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_train, argv)


if __name__ == "__main__":
    sys.exit(main())
