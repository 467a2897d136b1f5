"""The lab's command: the input pipeline, the trainer's step and DDP scaling as ratios measured side by
side, and the recipe comparison with the seed tutorial. From the repository root of a clone:

    python -m lab.bench data [--data SHARDS] [--size PX] [--batch N] [--workers 0,1,2]
    python -m lab.bench train [--width 64] [--size 256] [--batch 2] [--amp bf16|off] [--channels-last]
                              [--compile [--compile-mode M]] [--device cpu|cuda]
    python -m lab.bench scaling [--procs 2] [--batch GLOBAL]
    python -m lab.bench all [--device cuda] [--json OUT]          # the three, defaults (< 10 min on 2 cores)
    python -m lab.bench recipe --data SHARDS --minutes 12 [--ranks 2] [--seeds 0,1] [key=value ...]
    python -m lab.bench index [--samples 1000000] [--workers 1,2] [--json OUT]   # the sample index at scale
    python -m lab.bench goodput [--data SHARDS] [--procs 2] [--device cpu|cuda] [--json OUT] [key=value ...]

Each measurement prints a progress line on stderr; the tables go to stdout, with min/median/max over
the timed repeats and a warning where max/min > 1.3. `--json OUT` writes every figure beside the
settings and environment it was measured in (data.pipeline_vs_bound, data.pipeline_vs_folder,
data.worker_scaling, train.overhead_ratio, train.mfu, scaling.efficiency, ...). Without `--data` the
procedural dataset is packed into a temporary folder at the size measured. `--device cuda` measures
16 x 256^2 and 8 x 512^2 (width 64, bf16, channels_last) and the loader at 512^2. The measurements
are `lab.bench_data`, `lab.bench_train` and `lab.bench_scaling`.

`goodput` runs the demo (configs/default.yaml on the synthetic set, 2 CPU processes through torchrun) end
to end and shows its goodput and where the rest of its wall time went (`lab.bench_goodput`).

`recipe` is about results, not speed: the seed tutorial's recipe and seg_dist's default, each trained for
the same wall-clock minutes on this machine, scored on the test split (`lab.bench_recipe`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seg_dist import atomic, cli
from seg_dist.config import COMPILE_MODES

from . import bench_data, bench_goodput, bench_index, bench_recipe, bench_scaling, bench_train, measure

SECTIONS = ("data", "train", "scaling")


def _workers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts like 0,1,2") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts >= 0 like 0,1,2")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if there")
    common.add_argument("--data", default=None, help="shard folder (default: the synthetic set, packed at --size)")
    common.add_argument("--json", default=None, metavar="OUT", help="write every figure and its settings here")
    common.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    common.add_argument("--synthetic", type=int, default=96, metavar="N", help="samples in the synthetic set")

    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="section", required=True, metavar="{data,train,scaling,all,recipe,index,goodput}")

    d = sub.add_parser("data", parents=[common], help="decode, augment, shard pipeline, folder Dataset")
    d.add_argument("--size", type=int, default=None, help="training crop (default 256; 512 on cuda)")
    d.add_argument("--batch", type=int, default=None, help="default 8")
    d.add_argument("--workers", type=_workers, default=None, help="loader workers to try, e.g. 0,1,2 (default: "
                   "0 up to the cores)")
    d.add_argument("--samples", type=int, default=None, help="samples per timed repeat (default 512)")

    def model_args(q: argparse.ArgumentParser, width: int, size: int, batch: str, channels_last: str) -> None:
        q.add_argument("--width", type=int, default=None, help=f"U-Net base channels (default {width})")
        q.add_argument("--depth", type=int, default=None, help="U-Net levels (default 4)")
        q.add_argument("--size", type=int, default=None, help=f"training crop (default {size})")
        q.add_argument("--batch", type=int, default=None, help=batch)
        q.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None,
                       help="autocast dtype (default auto: bf16 where supported)")
        q.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help=f"channels_last model and batches (default {channels_last})")
        q.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
        q.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                       help="torch.compile mode with --compile (default auto: reduce-overhead, i.e. CUDA "
                       "graphs, on one GPU; else default)")
        q.add_argument("--workers", type=int, default=None, help="the trainer's loader workers (default 0; cuda: "
                       "cores - 2)")
        q.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
        q.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default 5)")

    t = sub.add_parser("train", parents=[common], help="trainer step vs a bare loop: overhead, MFU, memory")
    model_args(t, 64, 256, "batch (default 2; cuda: 16 x 256^2 and 8 x 512^2)", "on")
    t.add_argument("--no-ddp", dest="ddp", action="store_false", default=None,
                   help="the trainer without a process group, so without DDP")

    s = sub.add_parser("scaling", parents=[common], help="1 process vs N at the same global batch")
    s.add_argument("--procs", type=int, default=None, help="processes to compare with 1 (default 2)")
    model_args(s, 16, 128, "global batch, the same for 1 and N processes (default 8)", "off")
    s.add_argument("--pin", dest="pin_cpu_ranks", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU ranks on their own cores, as train.pin_cpu_ranks (default on)")

    a = sub.add_parser("all", parents=[common], help="data, train and scaling with their defaults")
    a.add_argument("--compile", action="store_true", default=None, help="torch.compile in bench train")
    a.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, help="torch.compile mode with --compile")

    x = sub.add_parser("index", help="the sample index of a million tiny samples: load time, first batch, memory")
    x.add_argument("--samples", type=int, default=1_000_000, help="samples written (default 1,000,000)")
    x.add_argument("--per-shard", type=int, default=None, help="samples per shard (default: the packer's, 256)")
    x.add_argument("--workers", type=_workers, default=None, help="worker counts for the first batch (default "
                   "1 and max(2, cores))")
    x.add_argument("--batch", type=int, default=64, help="micro-batch of the first batch (default 64)")
    x.add_argument("--repeats", type=int, default=3, help="index loads timed (default 3)")
    x.add_argument("--no-headers", dest="headers", action="store_false", help="skip reading the index from the "
                   "tar headers (as for shards without an index file)")
    x.add_argument("--data", default=None, help="a folder an earlier `bench index` wrote (default: write one)")
    x.add_argument("--json", default=None, metavar="OUT", help="write every figure and its settings here")

    g = sub.add_parser("goodput", help="the demo run end to end: goodput and where the rest of the wall time went")
    g.add_argument("--data", default=None, help="shard folder (default: the demo's synthetic set, packed into a "
                   "temporary folder)")
    g.add_argument("--procs", type=int, default=2, help="processes under torchrun (default 2)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train.device (default cpu)")
    g.add_argument("--config", default="configs/default.yaml", help="default: configs/default.yaml (the demo)")
    g.add_argument("--json", default=None, metavar="OUT", help="write the run's goodput.json and settings here")
    g.add_argument("overrides", nargs="*", help="key.sub=value for the run")

    r = sub.add_parser("recipe", help="the seed tutorial's recipe vs seg_dist's at the same training minutes")
    r.add_argument("--data", required=True, help="shard folder with train, val and test splits")
    r.add_argument("--minutes", type=float, default=12.0, help="training budget per run (default 12)")
    r.add_argument("--width", type=int, default=16, help="U-Net base channels for both (default 16)")
    r.add_argument("--batch", type=int, default=8, help="global batch for both (default 8, the tutorial's)")
    r.add_argument("--ranks", type=int, default=2, help="seg_dist's processes (default 2)")
    r.add_argument("--seeds", type=_workers, default=(0,), help="e.g. 0,1: one run per recipe and seed")
    r.add_argument("--recipes", default="seed,seg_dist", help="which to run (default seed,seg_dist)")
    r.add_argument("--seed-lr", type=float, default=1e-4, help="the tutorial's learning rate (default 1e-4, "
                   "as in the article)")
    r.add_argument("--seed-size", type=_size, default=None, metavar="H,W",
                   help="the tutorial's Resize (default: the train split's mean size)")
    r.add_argument("--seed-max-epochs", type=int, default=10_000, metavar="N",
                   help="end the tutorial's run after N epochs if its budget lasts that long (seg_dist's cap: "
                   "train.epochs=N)")
    r.add_argument("--config", default=None, help="seg_dist's recipe (default: the built-in defaults)")
    r.add_argument("--out", default=None, help="folder for the runs (default runs/recipe-<data folder name>)")
    r.add_argument("--test-split", default="test")
    r.add_argument("--json", default=None, metavar="OUT", help="write the runs, means and per-class IoU here")
    r.add_argument("overrides", nargs="*", help="key.sub=value for seg_dist's recipe")
    return p.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected H,W like 208,136") from None
    return h, w


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n, None) for n in names}


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _recipe(args: argparse.Namespace) -> int:
    settings = bench_recipe.RecipeSettings(
        data=args.data, minutes=args.minutes, width=args.width, global_batch=args.batch, ranks=args.ranks,
        seeds=args.seeds, recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
        seed_lr=args.seed_lr, seed_size=args.seed_size, seed_max_epochs=args.seed_max_epochs, config=args.config,
        overrides=tuple(args.overrides),
        out=args.out or f"runs/recipe-{Path(args.data).resolve().name}", test_split=args.test_split,
    )
    report = bench_recipe.compare(settings, progress=_say)
    print(bench_recipe.render(report), flush=True)
    return _finish(report, args, None)


def _finish(report: dict[str, Any], args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The command line beside the figures, and --json written."""
    report.setdefault("command", ["python", "-m", "lab.bench", *(sys.argv[1:] if argv is None else argv)])
    if args.json:
        atomic.write_text(args.json, json.dumps(report, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return cli.EXIT_OK


def _index(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    given = {k: getattr(args, k) for k in ("per_shard", "workers") if getattr(args, k) is not None}
    settings = bench_index.IndexSettings(samples=args.samples, batch=args.batch, repeats=args.repeats,
                                         headers=args.headers, data=args.data, **given)
    report = bench_index.measure_index(settings, progress=_say)
    print(bench_index.render(report), flush=True)
    return _finish(report, args, argv)


def _goodput(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    settings = bench_goodput.GoodputSettings(data=args.data, procs=args.procs, config=args.config,
                                             device=args.device, overrides=tuple(args.overrides))
    report = bench_goodput.measure_goodput(settings, progress=_say)
    print(bench_goodput.render(report), flush=True)
    return _finish(report, args, argv)


def _bench(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.section == "recipe":
        return _recipe(args)
    if args.section == "goodput":
        return _goodput(args, argv)
    if args.section == "index":
        return _index(args, argv)
    device = measure.resolve_device(args.device)
    sections = SECTIONS if args.section == "all" else (args.section,)
    report: dict[str, Any] = {"command": ["python", "-m", "lab.bench", *(sys.argv[1:] if argv is None else argv)]}
    with tempfile.TemporaryDirectory(prefix="seg_dist_bench_") as tmp:
        synthetic = measure.SyntheticShards(tmp, n=args.synthetic, progress=_say)

        def root(size: int) -> str:
            return args.data or synthetic.root(size)

        common = {"repeats": args.repeats}
        if "data" in sections:
            given = {**common, **_given(args, "size", "batch", "workers", "samples")}
            settings = bench_data.DataSettings.for_device(device, root="", **given)
            settings.root = root(settings.size)
            report["data"] = bench_data.measure_data(settings, progress=_say)
            print(bench_data.render(report["data"]), flush=True)
        if "train" in sections:
            given = {**common, **_given(args, "width", "depth", "size", "batch", "amp", "channels_last", "compile",
                                        "compile_mode", "workers", "warmup", "steps", "ddp")}
            cases = []
            for case in bench_train.TrainSettings.for_device(device, root="", **given):
                case.root = root(case.size)
                cases.append(bench_train.measure_train(case, progress=_say))
                print(bench_train.render(cases[-1]), flush=True)
            last = cases[-1]  # the largest images: where the GPU targets are set
            report["train"] = {k: last[k] for k in ("overhead_ratio", "mfu", "images_per_s", "settings", "env")}
            report["train"]["cases"] = cases
        if "scaling" in sections:
            given = {**common, **_given(args, "procs", "width", "depth", "size", "batch", "amp", "channels_last",
                                        "compile", "compile_mode", "workers", "warmup", "steps", "pin_cpu_ranks")}
            scaling = bench_scaling.ScalingSettings.for_device(device, root="", **given)
            why = bench_scaling.unavailable(device, scaling.procs) if args.section == "all" else None
            if why:  # `all` on one GPU still reports the other sections
                report["scaling"] = {"skipped": why}
                _say(f"bench scaling skipped: {why}")
            else:
                scaling.root = root(scaling.size)
                report["scaling"] = bench_scaling.measure_scaling(scaling, progress=_say)
                print(bench_scaling.render(report["scaling"]), flush=True)
    return _finish(report, args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_bench, argv)


if __name__ == "__main__":
    sys.exit(main())
