"""Masks (and pictures) for image files from a trained checkpoint.

    python -m seg_dist.predict --checkpoint runs/x/checkpoints/best.pt --input photos/ --out masks/ --overlay
    seg-dist predict --checkpoint ... --input 'photos/*.jpg' --out masks/ [--tile 1024] [--tta flip]

Images are what the model trained on (the checkpoint's channels and pixel type): JPEG, PNG (8 and 16 bits),
BMP, TIFF (any band count, uint8, uint16 or float32) and `.npy` arrays, decoded as pack decodes them
(`shards.decode_image`); 8-bit grey runs on an RGB model as RGB; an image of another kind is named, with
both kinds, and skipped. For every image, OUT/<relative path>.png holds its class ids at the image's own
size (a palette PNG in the checkpoint's class colours: `np.array(Image.open(f))` reads the ids back); with
--overlay, OUT/<relative path>_overlay.png shows image | prediction | blend with a legend (the image's
`data.display_bands`, 16-bit and float bands stretched). A folder's structure is kept.
Each image runs at the scale the model trained at (the checkpoint's pack --max-size; --native-scale runs it
as it is) and its mask comes back at its own size; an image still far from the training scale is
warned about once, by name. Images smaller than the model's smallest input are padded, large ones run as
tiles, with a progress bar where they take more than a few seconds (see seg_dist/inference.py). An
unreadable image is named and skipped, the others are still written, and the exit code is then 1. No mask
or overlay may replace an input image or the checkpoint, even with --overwrite (seg_dist/outputs.py). From
Python: `Predictor` (see seg_dist/inference.py).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import cli, outputs
from .errors import RunFailed, UserError
from .inference import Predictor
from .pack.pairing import IMAGE_SUFFIXES
from .runlog import progress
from .shards import ImageError, decode_image
from .visualize import save_mask_png, save_png

__all__ = ["TILE_PROGRESS_AFTER_S", "Predictor", "find_images", "main", "read_image_file"]

log = logging.getLogger("seg_dist.predict")

# An image whose tiles would take longer than this (projected from the first ones) shows a bar over them.
TILE_PROGRESS_AFTER_S = 3.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="an image, a folder (searched recursively) or a quoted glob")
    p.add_argument("--out", required=True, help="folder for the masks (and overlays)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png pictures")
    p.add_argument("--tile", type=int, default=0,
                   help="tile side in px for large images (default: whole images up to 4 Mpx, 1024 px tiles above)")
    p.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbours")
    p.add_argument("--tta", choices=["none", "flip"], default="none", help="test-time augmentation")
    p.add_argument("--native-scale", action="store_true",
                   help="run images at their own size, not brought to the packing scale (pack --max-size) the "
                        "model trained at")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size run together (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace masks already in --out")
    return p.parse_args(argv)


def find_images(spec: str) -> list[tuple[Path, Path]]:
    """(image, output name without suffix) pairs: a folder keeps its relative layout, a file or glob its stem."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(f, f.relative_to(path).with_suffix("")) for f in files]
    if path.is_file():
        return [(path, Path(path.stem))]
    files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files and not glob.has_magic(spec):
        raise UserError(f"{spec}: no such file or folder")
    return [(f, Path(f.stem)) for f in files]


def read_image_file(src: Path, decode: Callable[[bytes], np.ndarray] = decode_image) -> np.ndarray:
    """The image at `src` as `decode` reads it (`shards.decode_image`, or a Predictor's `read`, which also
    checks it is of the model's kind). An ImageError (a UserError) says what is wrong with it: unreadable,
    undecodable, of another kind than the model's, or larger than Pillow decodes (its guard against
    decompression bombs, with the size and what to do). Pillow's warning for images between its two limits
    is replaced by one line saying the file and its size."""
    try:
        data = src.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read the file ({e.strerror or e})") from e
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = decode(data)
        except ImageError as e:
            if isinstance(e.__cause__, Image.DecompressionBombError):
                raise ImageError(_too_large(e.__cause__)) from e
            raise
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            h, w_ = image.shape[:2]
            log.warning("%s: %d x %d px (%.3g Mpx) is above Pillow's %.3g Mpx decompression-bomb warning size; "
                        "read as asked for", src, w_, h, h * w_ / 1e6, (Image.MAX_IMAGE_PIXELS or 0) / 1e6)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return image


def _too_large(error: BaseException) -> str:
    """An image Pillow refuses to decode, with its size and how to proceed."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)) / 1e6:.3g} Mpx" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (f"{size}, more than the {limit:.3g} Mpx Pillow decodes (its guard against decompression bombs); "
            "reduce or split it first, e.g. `magick IN -resize 50% OUT.png` or `magick IN -crop 8192x8192 "
            "OUT_%d.png`")


@contextlib.contextmanager
def _console() -> Iterator[None]:
    """seg_dist's warnings and progress lines on stderr for this command, where its errors go too (no rank:
    predict is one process), unless the process already logs somewhere."""
    root, logger = logging.getLogger(), logging.getLogger("seg_dist")
    if root.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check_paths(args: argparse.Namespace, jobs: list[tuple[Path, Path]]) -> None:
    """Masks and overlays may land neither on an input image nor on the checkpoint; existing ones need
    --overwrite. Also refused: two images whose outputs would share a name (a/x.jpg and a/x.png)."""
    out = Path(args.out)
    by_name: dict[Path, list[Path]] = {}
    for src, name in jobs:
        by_name.setdefault(name, []).append(src)
    clashes = {name: srcs for name, srcs in by_name.items() if len(srcs) > 1}
    if clashes:
        name, srcs = next(iter(sorted(clashes.items())))
        raise UserError(f"--input {args.input}: {' and '.join(map(str, srcs[:3]))} would both be written to "
                        f"{out / name}.png ({len(clashes)} such name(s)); rename one of them")
    ins = [outputs.Input(Path(args.checkpoint), "the checkpoint the masks come from",
                         f"--checkpoint {args.checkpoint}"),
           *(outputs.Input(src, f"the input image {src}", f"--input {args.input}") for src, _ in jobs)]
    outs: list[outputs.Output | outputs.OutputFolder] = [
        outputs.OutputFolder(out, "the folder for the masks", f"--out {args.out}")]
    for src, name in jobs:
        outs.append(outputs.Output(out / f"{name}.png", f"the mask of {src}", f"--out {args.out}"))
        if args.overlay:
            outs.append(outputs.Output(out / f"{name}_overlay.png", f"the overlay of {src}", f"--out {args.out}"))
    outputs.check(ins, outs, overwrite=args.overwrite)


def _predict(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1 or not 0 <= args.overlap < 1 or args.tile < 0:
        raise UserError("--batch-size must be >= 1, --overlap in [0, 1) and --tile >= 0")
    jobs = find_images(args.input)
    if not jobs:
        raise UserError(f"{args.input}: no images ({', '.join(IMAGE_SUFFIXES)})")
    _check_paths(args, jobs)
    with _console():
        return _predict_all(args, jobs)


def _predict_all(args: argparse.Namespace, jobs: list[tuple[Path, Path]]) -> int:
    out = Path(args.out)
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, tile=args.tile, overlap=args.overlap,
                                          tta_flip=args.tta == "flip", native_scale=args.native_scale,
                                          tile_progress_after=TILE_PROGRESS_AFTER_S)
    failed: list[Path] = []
    far = 0  # images far from the training scale (the first is warned about by name)
    with progress(len(jobs), "predict", enabled=len(jobs) > 1) as bar:
        for i in range(0, len(jobs), args.batch_size):
            batch = []
            for src, name in jobs[i : i + args.batch_size]:
                try:
                    image = read_image_file(src, predictor.read)
                except ImageError as e:
                    failed.append(src)
                    print(f"error: {src}: {e}; skipped", file=sys.stderr)
                    continue
                if min(image.shape[:2]) < 1:
                    failed.append(src)
                    print(f"error: {src}: the image has no pixels ({image.shape[1]} x {image.shape[0]}); skipped",
                          file=sys.stderr)
                    continue
                far += predictor.check_scale(*image.shape[:2], str(src))
                batch.append((image, name, src))
            masks = predictor.predict_batch([image for image, _, _ in batch], [str(src) for _, _, src in batch])
            for (image, name, _), mask in zip(batch, masks, strict=True):
                save_mask_png(out / f"{name}.png", mask, predictor.num_classes, colours=predictor.colours)
                if args.overlay:
                    save_png(out / f"{name}_overlay.png", predictor.overlay(image, mask))
            bar.update(len(jobs[i : i + args.batch_size]))
    done = len(jobs) - len(failed)
    print(f"wrote {done} of {len(jobs)} mask(s){' and overlays' if args.overlay else ''} to {out}"
          f"{f'; {len(failed)} image(s) skipped' if failed else ''}"
          f"{f'; {far} image(s) far from the training scale (the first named above)' if far else ''}")
    if failed:
        raise RunFailed(f"{len(failed)} of {len(jobs)} image(s) could not be read (first: {failed[0]})")
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_predict, argv)


if __name__ == "__main__":
    sys.exit(main())
