"""Masks (and pictures) for image files from a trained checkpoint.

    python -m seg_dist.predict --checkpoint runs/x/checkpoints/best.pt --input photos/ --out masks/ --overlay
    seg-dist predict --checkpoint ... --input 'photos/*.jpg' --out masks/ [--tile 1024] [--tta flip]
    python -m seg_dist.predict --checkpoint ... --shards shards/scenes [--split val] --out masks/ [--overlay]

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

--shards ROOT predicts the scenes of a split packed with pack --tile: each stored tile runs as it is, and
the tiles' logits are blended into their scene (`tiles.Assembler(blend=True)`, as the Predictor blends the
tiles of a large image), so OUT/<scene key>.png is the scene's mask at the scene's size; pixels no tile
covers (tiles pack --drop-empty left out) hold the ignore index. A scene's logits are held in memory up to
SCENE_MEMORY_BYTES, in a temporary file in OUT above that (so is its image, for --overlay). A folder packed
without --tile is refused: its samples are whole images, best predicted from their files with --input.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import cli, data, outputs, remote, shards, tiles
from .errors import RunFailed, UserError
from .inference import BAND_VALUES, Predictor, host_logits
from .pack.pairing import IMAGE_SUFFIXES
from .runlog import progress
from .shards import ImageError, decode_image, promotable
from .visualize import save_mask_png, save_png

__all__ = ["OVERLAY_SIDE", "SCENE_MEMORY_BYTES", "TILE_PROGRESS_AFTER_S", "Predictor", "find_images", "main",
           "read_image_file", "scene_plan"]

log = logging.getLogger("seg_dist.predict")

# An image whose tiles would take longer than this (projected from the first ones) shows a bar over them.
TILE_PROGRESS_AFTER_S = 3.0
# --shards: a scene's blended logits (H x W x classes float32) larger than this, and its image for --overlay,
# live in a temporary file beside the masks instead of memory (1 GiB: a 16 Mpx scene of 16 classes).
SCENE_MEMORY_BYTES = 1 << 30
# A scene's overlay is drawn from every k-th pixel, k the smallest that brings its longer side to this (the
# picture is at most 2048 px a side anyway).
OVERLAY_SIDE = 4096
# A tile's key (shards/README.md): `<scene key>__y<top>_x<left>`, zero-padded.
_TILE_KEY = re.compile(r"(.+)__y\d+_x\d+")
DEFAULT_OVERLAP = 0.25


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image, a folder (searched recursively) or a quoted glob")
    source.add_argument("--shards", help="a folder packed with pack --tile: predict its scenes from their tiles")
    p.add_argument("--split", default=None, help="with --shards: the split whose scenes to predict (default val)")
    p.add_argument("--out", required=True, help="folder for the masks (and overlays)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png pictures")
    p.add_argument("--tile", type=int, default=0,
                   help="tile side in px for large images (default: the checkpoint's training tiles, pack --tile, "
                        "for images larger than them; else whole images up to 4 Mpx, 1024 px tiles above)")
    p.add_argument("--overlap", type=float, default=None,
                   help=f"fraction of a tile shared with its neighbours (default: the training tiles' overlap "
                        f"with the default tile, else {DEFAULT_OVERLAP})")
    p.add_argument("--tta", choices=["none", "flip"], default="none", help="test-time augmentation")
    p.add_argument("--native-scale", action="store_true",
                   help="run images at their own size, not brought to the packing scale (pack --max-size) the "
                        "model trained at")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images (with --shards: tiles) of one size run together (default 4)")
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
                raise ImageError(shards.too_many_pixels(e.__cause__)) from e
            raise
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            h, w_ = image.shape[:2]
            log.warning("%s: %d x %d px (%.3g Mpx) is above Pillow's %.3g Mpx decompression-bomb warning size; "
                        "read as asked for", src, w_, h, h * w_ / 1e6, (Image.MAX_IMAGE_PIXELS or 0) / 1e6)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return image



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
    if args.batch_size < 1 or not 0 <= (args.overlap or 0) < 1 or args.tile < 0:
        raise UserError("--batch-size must be >= 1, --overlap in [0, 1) and --tile >= 0")
    if args.shards is not None:
        return _predict_shards(args)
    if args.split is not None:
        raise UserError(f"--split {args.split} chooses the split of --shards; --input {args.input} names files")
    jobs = find_images(args.input)
    if not jobs:
        raise UserError(f"{args.input}: no images ({', '.join(IMAGE_SUFFIXES)})")
    _check_paths(args, jobs)
    with _console():
        return _predict_all(args, jobs)


def _predict_all(args: argparse.Namespace, jobs: list[tuple[Path, Path]]) -> int:
    out = Path(args.out)
    overlap = {} if args.overlap is None else {"overlap": args.overlap}
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device, tile=args.tile, tta_flip=args.tta == "flip",
                                          native_scale=args.native_scale, tile_progress_after=TILE_PROGRESS_AFTER_S,
                                          **overlap)
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


# --- --shards: whole scenes from their tiles -----------------------------------------------------------


def scene_plan(root: str, manifest: dict, split: str) -> list[tuple[str, int]]:
    """(scene key, tile count) of each scene of a tiled split, in shard order, from the split's sample index
    (tile keys, no image read). A UserError where a sample is no tile or a scene's tiles are not consecutive."""
    index = data.split_index(root, manifest, split)
    plan: list[tuple[str, int]] = []
    for i in range(len(index)):
        key = index.key(i)
        found = _TILE_KEY.fullmatch(key)
        if found is None:
            raise UserError(f"--shards {root}: sample {key!r} of split {split!r} is not a tile (keys of pack --tile "
                            "end in __y<top>_x<left>); re-pack the split")
        if plan and plan[-1][0] == found.group(1):
            plan[-1] = (found.group(1), plan[-1][1] + 1)
        else:
            plan.append((found.group(1), 1))
    seen: set[str] = set()
    for scene, _ in plan:
        if scene in seen:
            raise UserError(f"--shards {root}: the tiles of scene {scene!r} in split {split!r} are not consecutive "
                            "(pack writes a scene's tiles together); re-pack the split")
        seen.add(scene)
    return plan


def _predict_shards(args: argparse.Namespace) -> int:
    root, split = args.shards, args.split or "val"
    if remote.is_remote(root):
        raise UserError(f"--shards {root}: a local folder; copy the shards here first")
    manifest = shards.load_manifest(root)
    tiling = manifest.get("tiling")
    if not tiling:
        raise UserError(f"--shards {root}: not packed with --tile (its manifest's tiling is null), so its samples "
                        "are whole images, not tiles of scenes; predict their files with --input")
    given = [flag for flag, on in (("--tile", args.tile), ("--overlap", args.overlap is not None),
                                   ("--native-scale", args.native_scale)) if on]
    if given:
        raise UserError(f"{' and '.join(given)} do not apply to --shards: its tiles ({tiling['size']} px, "
                        f"{tiling['overlap']} px overlap) are predicted as they were packed")
    plan = scene_plan(root, manifest, split)
    out = Path(args.out)
    ins: list[outputs.Input | outputs.InputFolder] = [
        outputs.Input(Path(args.checkpoint), "the checkpoint the masks come from", f"--checkpoint {args.checkpoint}"),
        *outputs.shard_inputs(root, f"--shards {root}", "the data being predicted")]
    outs: list[outputs.Output | outputs.OutputFolder] = [
        outputs.OutputFolder(out, "the folder for the masks", f"--out {args.out}")]
    for scene, _ in plan:
        outs.append(outputs.Output(out / f"{scene}.png", f"the mask of scene {scene}", f"--out {args.out}"))
        if args.overlay:
            outs.append(outputs.Output(out / f"{scene}_overlay.png", f"the overlay of scene {scene}",
                                       f"--out {args.out}"))
    outputs.check(ins, outs, overwrite=args.overwrite)
    with _console():
        # Each stored tile runs whole: tiles no larger than the Predictor's tile are never cut again.
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device, tile=tiling["size"],
                                              tta_flip=args.tta == "flip")
        kind = shards.image_spec(manifest)
        if not promotable(kind, predictor.spec):
            raise UserError(f"--shards {root}: {kind.text()} images, but the model was trained on "
                            f"{predictor.spec.text()} images")
        out.mkdir(parents=True, exist_ok=True)
        samples = data.iter_samples(shards.shard_urls(root, manifest, split))
        by_scene = itertools.groupby(samples, key=lambda s: _tile_of(s)[0])
        with progress(sum(n for _, n in plan), f"predict {split}", enabled=True) as bar:
            for (scene, _), (found, group) in zip(plan, by_scene, strict=True):
                if found != scene:
                    raise UserError(f"--shards {root}: split {split!r} holds scene {found!r} where its index has "
                                    f"{scene!r}; re-pack the split")
                _predict_scene(predictor, scene, group, args, bar)
    print(f"wrote {len(plan)} scene mask(s){' and overlays' if args.overlay else ''} of split {split!r} to {out}")
    return cli.EXIT_OK


def _tile_of(sample: dict) -> tuple[str, tiles.Window, tuple[int, int]]:
    placed = tiles.window_of(sample["meta"])
    if placed is None:
        raise UserError(f"{sample['url']}: sample {sample['key']!r} has no tile entry in its JSON; re-pack the split")
    return placed


def _predict_scene(predictor: Predictor, scene: str, group: Iterator[dict], args: argparse.Namespace,
                   bar: Any) -> None:
    """One scene: its tiles' logits blended into the scene, argmax, holes set to the ignore index, written."""
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        logits: tiles.Assembler | None = None
        picture: tiles.Assembler | None = None
        while batch := list(itertools.islice(group, args.batch_size)):
            placed = [_tile_of(s) for s in batch]
            if logits is None:
                hw = placed[0][2]
                logits = tiles.Assembler(hw, blend=True, out=_scene_array(
                    (*hw, predictor.num_classes), np.float32, out, stack))
                if args.overlay:
                    image = batch[0]["image"]
                    picture = tiles.Assembler(hw, out=_scene_array((*hw, *image.shape[2:]), image.dtype, out, stack))
            for sample, (_, window, _), tile_logits in zip(
                    batch, placed, predictor.logits_batch([s["image"] for s in batch], [scene] * len(batch)),
                    strict=True):
                logits.add(host_logits(tile_logits), window)
                if picture is not None:
                    picture.add(sample["image"], window)
            bar.update(len(batch))
        assert logits is not None
        mask = _scene_mask(logits.result(), logits.covered(), predictor.ignore_index)
        save_mask_png(out / f"{scene}.png", mask, predictor.num_classes, colours=predictor.colours)
        if picture is not None:
            step = math.ceil(max(mask.shape) / OVERLAY_SIDE)
            image = np.ascontiguousarray(picture.result()[::step, ::step])
            save_png(out / f"{scene}_overlay.png", predictor.overlay(image, mask[::step, ::step]))


def _scene_array(shape: tuple[int, ...], dtype: np.dtype, folder: Path, stack: contextlib.ExitStack) -> np.ndarray:
    """An array for a scene: in memory up to SCENE_MEMORY_BYTES, else a memmap of a temporary file in
    `folder` (beside the masks, on their disk; removed when `stack` closes), its blocks allocated first so
    that a full disk is one line here, not a crash when a page of the memmap cannot be written."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes <= SCENE_MEMORY_BYTES:
        return np.empty(shape, dtype)
    fd, name = tempfile.mkstemp(prefix=".seg_dist-scene-", suffix=".tmp", dir=folder)
    stack.callback(os.unlink, name)
    with os.fdopen(fd, "wb") as f:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
        except OSError as e:
            raise UserError(f"--out {folder}: no room for a scene's {nbytes / 1e9:.3g} GB working file "
                            f"({e.strerror or e}); free space there or choose another --out") from e
    return np.memmap(name, dtype, "r+", shape=shape)


def _scene_mask(logits: np.ndarray, covered: np.ndarray, ignore_index: int) -> np.ndarray:
    """argmax over the last axis of H x W x C `logits` (in bands of rows: it may be a memmap), the
    `ignore_index` where `covered` is False."""
    height, width, classes = logits.shape
    mask = np.empty((height, width), np.int64 if max(classes - 1, ignore_index) > 65535 else np.uint16)
    rows = max(1, BAND_VALUES // (width * classes))
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        mask[band] = np.where(covered[band], logits[band].argmax(-1), ignore_index)
    return mask


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_predict, argv)


if __name__ == "__main__":
    sys.exit(main())
