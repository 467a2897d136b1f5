"""Inference on whole images at their original size: the one path predict and evaluate share.

    from seg_dist.predict import Predictor
    p = Predictor.from_checkpoint("runs/x/checkpoints/best.pt")
    image = p.read(Path("scene.tif").read_bytes())   # decoded and checked as the model's inputs
    mask = p(image)                 # H x W x C image -> int64 H x W class ids, same size
    picture = p.overlay(image, mask)

The model takes the images it trained on: the checkpoint's `input` (channels and pixel type, uint8, uint16
or float32; `checkpoint.input_contract`). `read` decodes file bytes with `shards.decode_image` and checks
them with `shards.conform_image` (8-bit grey becomes RGB for an RGB model; any other kind is an ImageError
naming both kinds); arrays given directly are checked the same way. The pixels stay in their own type all
the way to `data.normalize`, never squeezed to 8 bits.

An image is first brought to the scale the model trained at: pack --max-size scaled every image whose
longer side exceeded it down to that side (`shards.packed_size`), so the Predictor does the same with the
checkpoint's `max_size`, with pack's filters (`resize_image`: PIL bilinear for 8-bit images of 1 to 4
channels, OpenCV area averaging for the others; `native_scale=True` or predict --native-scale runs images
as given). It is then normalised as in training (the checkpoint's mean/std), resized to
`data.val_size` when the model was validated at a fixed size, and run. The logits are brought back to
the input's size bilinearly before the argmax, so class borders fall between the low-resolution pixels
as the model's scores cross, instead of in blocks of the scale factor that resizing the labels (nearest)
would leave; the mask always has the input's size. An input whose scale, after that, is still far from
the training frames' (more than SCALE_TOLERANCE times larger or smaller) is warned about once per
Predictor. Mixed precision only on CUDA (`train.amp` as trained): on the CPU the model runs in fp32,
so its masks are those of an fp32 export. An image smaller than the model's smallest input (2**depth
for the U-Net) is padded at the bottom and right with the mean colour (0 after normalisation, as
`SmpSegmenter` pads) and its logits cropped back. Large images go through overlapping tiles whose logits are
blended with a smooth weight, so memory stays bounded and tile borders leave no seams; with
`tile_progress_after`, the tiles of an image that would take longer than that show a progress bar.

Tiles follow `seg_dist.tiles`, the one home of tile geometry, as pack --tile cuts scenes: `tiles.grid`
(windows `tile - overlap` px apart, the last row and column flush with the border) and
`tiles.Assembler(blend=True)` (weights falling linearly towards each tile's border), in host memory, so a
large image's logits never need device memory. A checkpoint trained on tiles (`TrainedModel.tiling`) runs
any image larger than its training tile as tiles of that size and overlap: a scene predicted from its file
then gets the mask its packed tiles get (`predict --shards`), and since tiles are cut at the scene's own
scale, a scene's size says nothing about its scale: no scale warning for such checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, precision, tiles
from .config import DataConfig
from .data import normalize
from .data.transforms import AUTO_CROP_MAX
from .models.unet import UNet
from .runlog import progress
from .shards import RGB8, ImageError, ImageSpec, conform_image, decode_image, packed_size, promotable, resize_image
from .visualize import display_bands, overlay_with_legend, palette

__all__ = ["AUTO_TILE_PIXELS", "BAND_VALUES", "SCALE_TOLERANCE", "Predictor", "host_logits", "min_input_size",
           "training_side", "upsampled_argmax"]

log = logging.getLogger(__name__)

# Above this many pixels an image is tiled even without --tile (4 Mpx: a 2000 x 2000 photo goes whole).
AUTO_TILE_PIXELS = 4_000_000
AUTO_TILE = 1024
# An input whose longer side (at the scale it runs at) is more than this factor above or below the training
# frames' is warned about: a convolutional network recognises objects at about the sizes it saw them, and
# the augmentation's scale jitter (0.9-1.1 by default) covers far less than a factor of 2.
SCALE_TOLERANCE = 2.0
# Logits brought back to the input's size in bands of about this many values (classes x rows x width), so a
# 100 Mpx mask never needs classes x 100 M floats at once.
BAND_VALUES = 1 << 24


@dataclass
class Predictor:
    """A trained model with what it needs to turn images into masks (see the module docstring)."""

    model: nn.Module  # in eval mode, on `device`
    data: DataConfig  # mean, std and val_size as trained
    num_classes: int
    class_names: list[str]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    tile: int = 0  # tile side in px; 0: whole images unless larger than AUTO_TILE_PIXELS
    overlap: float = 0.25  # fraction of a tile shared with its neighbour
    tile_overlap: int | None = None  # px shared by neighbouring tiles (the training tiles'); None: from `overlap`
    tta_flip: bool = False  # average with the horizontally flipped image's prediction
    min_size: int = 1  # the smallest height and width the model takes; smaller inputs are padded to it
    max_size: int | None = None  # the packing scale (pack --max-size) it trained at; None: images run as given
    native_scale: bool = False  # run images at their own size even where they exceed max_size
    train_side: float | None = None  # longer side of the training frames, for the scale warning; None: no warning
    colours: np.ndarray | None = None  # num_classes x 3 uint8 colours of masks and overlays; None: generated
    tile_progress_after: float | None = None  # seconds: show progress over the tiles of slower images; None: never
    spec: ImageSpec = RGB8  # channels and pixel type the model takes (the checkpoint's input)
    ignore_index: int = 255  # the label overlays leave uncoloured (pixels no tile of a scene covers)
    display_bands: list[int] | None = None  # the bands overlays show (data.display_bands); None: the default
    _scale_warned: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", **options: Any) -> Predictor:
        """`device`: auto (the first GPU if there is one), cpu, cuda or cuda:N; `options`: the fields above."""
        return cls.from_trained(checkpoint.load_model(path, distributed.named_device(device)), **options)

    @classmethod
    def from_trained(cls, trained: checkpoint.TrainedModel, **options: Any) -> Predictor:
        """From a model `checkpoint.load_model` loaded (with config overrides, say)."""
        cfg = trained.cfg
        device = next(trained.model.parameters()).device
        if cfg.train.channels_last:
            trained.model.to(memory_format=torch.channels_last)
        # bf16 autocast on a CPU would move masks off the fp32 ones an export gives, for little speed.
        options.setdefault("amp_dtype", precision.resolve_amp(cfg.train.amp, device) if device.type == "cuda" else None)
        options.setdefault("min_size", min_input_size(trained.model))
        options.setdefault("max_size", trained.max_size)
        options.setdefault("train_side", training_side(trained))
        options.setdefault("colours", _colours(trained.palette, trained.num_classes))
        options.setdefault("spec", trained.image)
        options.setdefault("display_bands", cfg.data.display_bands)
        options.setdefault("ignore_index", trained.ignore_index)
        if trained.tiling and not options.get("tile"):
            # The tiles it learnt from; without overlap, tile borders would show as seams: the default overlap.
            options["tile"] = trained.tiling["size"]
            if "overlap" not in options and trained.tiling["overlap"] > 0:
                options.setdefault("tile_overlap", trained.tiling["overlap"])
        display_bands(options["spec"].channels, options["display_bands"])  # a bad data.display_bands: now
        tile, crop = options.get("tile", 0), trained.train_crop
        if tile and crop and tile < max(crop):
            # A tile narrower than the crops gives each pixel less surrounding scene than training did, and
            # classes told apart by their surroundings then change well inside the tile, not only at its
            # blended borders (lab/recipe.md: the context a pixel needs).
            log.warning("tile %d px is smaller than the %d x %d crops the model trained on: tiles see less "
                        "context than training did, so masks may differ from whole-image ones; use --tile %d "
                        "or more", tile, crop[0], crop[1], max(crop))
        return cls(trained.model, cfg.data, trained.num_classes, trained.class_names, device,
                   channels_last=cfg.train.channels_last, **options)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """An H x W x C (or H x W) image of the model's kind (`image`) -> int64 H x W class ids."""
        return self.predict_batch([image])[0]

    def read(self, data: bytes) -> np.ndarray:
        """Image file bytes -> the H x W x C pixels the model takes, in their own type: `shards.decode_image`
        (with the alpha channel where the model was trained with it), then `conform_image`. An ImageError
        (one line, both kinds named) for an image of another kind."""
        return self.conform(decode_image(data, keep_alpha=self.spec.alpha))

    def conform(self, image: np.ndarray) -> np.ndarray:
        """`image` (H x W or H x W x C) as the model's kind: the same pixels, 8-bit grey expanded to RGB (and
        RGBA) where the model takes those; an ImageError naming both kinds for anything else."""
        a = np.asarray(image)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ImageError(f"an array of shape {a.shape}, the model takes H x W x {self.spec.channels} images")
        found = ImageSpec(a.shape[2], a.dtype.name, self.spec.alpha)
        if not promotable(found, self.spec):
            raise ImageError(f"a {found.text()} image, but the model was trained on {self.spec.text()} images")
        return conform_image(a, self.spec)

    def predict_batch(self, images: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> list[np.ndarray]:
        """Masks for several images; images that run at one size run as one batch. `labels` (file names, say)
        name the images in the scale warning and on the tiles' progress bar."""
        return [upsampled_argmax(logits, h, w).cpu().numpy()
                for logits, (h, w) in self._run_batch(images, labels)]

    def logits_batch(self, images: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> list[torch.Tensor]:
        """float32 C x H x W logits per image, at each image's own size (on the device)."""
        return [(logits if logits.shape[-2:] == (h, w) else
                 F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]).to(self.device)
                for logits, (h, w) in self._run_batch(images, labels)]

    def overlay(self, image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """image | prediction | blend, with a legend of the classes present: an H x W' x 3 uint8 picture; the
        image shows `display_bands` (`visualize.display_image`: 16-bit and float bands stretched)."""
        return overlay_with_legend(self.conform(image), mask, self.class_names, alpha=alpha, colours=self.colours,
                                   ignore_index=self.ignore_index, display_bands=self.display_bands)

    def overlap_px(self, tile: int) -> int:
        """Pixels neighbouring tiles of side `tile` share: `tile_overlap`, else `overlap` of the tile (the
        windows int(tile * (1 - overlap)) px apart, at least 1)."""
        if self.tile_overlap is not None:
            return self.tile_overlap
        return tile - max(1, int(tile * (1 - self.overlap)))

    def run_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size runs at: the packing scale (`shards.packed_size` with
        `max_size`), or its own with `native_scale`."""
        return (height, width) if self.native_scale else packed_size(height, width, self.max_size)

    def scale_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size is far from the scale the model trained at (run at `run_size`, its
        longer side more than SCALE_TOLERANCE times the training frames' or less than 1 / SCALE_TOLERANCE
        of it), with what to do; None when it is near, or the training scale is unknown. A model validated
        at `data.val_size` sees every input at that size, as in its validation: never far."""
        if not self.train_side or self.data.val_size > 0:
            return None
        rh, rw = self.run_size(height, width)
        ratio = max(rh, rw) / self.train_side
        if 1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE:
            return None
        side = round(self.train_side)
        runs = f" (run at {rw} x {rh})" if (rh, rw) != (height, width) else ""
        if ratio > 1:
            if self.native_scale and self.max_size and max(height, width) > self.max_size:
                advice = "drop --native-scale to run it at the packing scale"
            else:
                advice = f"reduce it to a longer side of about {side} px first"
            look = "larger"
        else:
            advice = f"enlarge it to a longer side of about {side} px, or train on images of this scale"
            look = "smaller"
        return (f"{width} x {height} px{runs} is {ratio:.2g}x the scale of the frames the model trained on "
                f"(longer side {side} px): objects look {look} than in training, so the mask may be poor; {advice}")

    def check_scale(self, height: int, width: int, label: str = "an input image") -> bool:
        """True when an image of this size is far from the training scale (`scale_problem`); the first
        such image of this Predictor is warned about, named by `label`."""
        problem = self.scale_problem(height, width)
        if problem and not self._scale_warned:
            self._scale_warned = True
            log.warning("%s: %s", label, problem)
        return problem is not None

    # --- internals ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _run_batch(self, images: Sequence[np.ndarray],
                   labels: Sequence[str] | None) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """(float32 C x h x w logits at the size each image runs at, on the device; the image's own H, W)."""
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        names = list(labels) if labels is not None else ["an input image"] * len(images)
        out: list[tuple[torch.Tensor, tuple[int, int]] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        pixels = [self.conform(image) for image in images]
        for i, image in enumerate(pixels):
            h, w = image.shape[:2]
            self.check_scale(h, w, names[i])
            groups.setdefault(self.run_size(h, w), []).append(i)
        for (h, w), idx in groups.items():
            batch = torch.stack([self._to_tensor(pixels[i]) for i in idx])
            label = names[idx[0]] + (f" and {len(idx) - 1} more" if len(idx) > 1 else "")
            logits = self._logits(batch, h, w, label)
            for j, i in enumerate(idx):
                out[i] = (logits[j], pixels[i].shape[:2])
        return out  # type: ignore[return-value]

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """The image (of the model's kind) at the scale it runs at (`run_size`, scaled as pack scales:
        `resize_image`), normalised in its own type, on the device: C x h x w float32."""
        h, w = self.run_size(*image.shape[:2])
        if (h, w) != image.shape[:2]:
            image = resize_image(image, h, w)
        return normalize(torch.from_numpy(np.ascontiguousarray(image)).to(self.device), self.data.mean,
                         self.data.std)

    def _logits(self, x: torch.Tensor, h: int, w: int, label: str = "") -> torch.Tensor | list[torch.Tensor]:
        size = self.data.val_size
        if size > 0 and (h, w) != (size, size):  # trained to see val_size x val_size: resize, run, resize back
            small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return F.interpolate(self._forward(small), size=(h, w), mode="bilinear", align_corners=False)
        tile = self.tile or (AUTO_TILE if h * w > AUTO_TILE_PIXELS else 0)
        if tile and (h > tile or w > tile):
            return self._tiled(x, tile, label)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._run(x)
        if self.tta_flip:
            logits = (logits + self._run(x.flip(-1)).flip(-1)) / 2
        return logits

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:
            x = F.pad(x, [0, pw, 0, ph])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(self.device, self.amp_dtype):
            return self.model(x).float()[..., :h, :w]

    def _tiled(self, x: torch.Tensor, tile: int, label: str = "") -> list[torch.Tensor]:
        """Each image's C x h x w logits (host memory) from the windows of `tiles.grid` (`overlap_px` shared),
        blended by `tiles.Assembler(blend=True)`: each tile's logits weighted by a ramp that falls towards
        its borders, so every pixel is a smooth mix of the tiles that cover it (no seams). Where the tiles
        would take longer than `tile_progress_after` seconds (projected from those done), a progress bar
        counts them."""
        n, _, h, w = x.shape
        windows = tiles.grid(h, w, tile, self.overlap_px(tile))
        scenes = [tiles.Assembler((h, w), blend=True) for _ in range(n)]
        bar, first_done = None, 0.0
        for done, window in enumerate(windows, 1):
            rows, cols = window.slices
            for scene, logits in zip(scenes, host_logits(self._forward(x[:, :, rows, cols])), strict=True):
                scene.add(logits, window)
            if self.tile_progress_after is None or done == len(windows):
                continue
            if bar is not None:
                bar.update(1)
                continue
            # Projected from the tiles after the first, whose time includes one-off warm-up (allocations,
            # kernels); host_logits waited for each tile's kernels.
            now = time.perf_counter()
            if done == 1:
                first_done = now
            elif (now - first_done) / (done - 1) * len(windows) > self.tile_progress_after:
                bar = progress(len(windows), f"{label or 'image'}: {len(windows)} tiles of {windows[0].h} x "
                               f"{windows[0].w} px", enabled=True, initial=done)
        if bar is not None:
            bar.update(1)
            bar.close()
        return [torch.from_numpy(scene.result()).permute(2, 0, 1) for scene in scenes]


def host_logits(logits: torch.Tensor) -> np.ndarray:
    """N x C x H x W (or C x H x W) logits on any device as float32 N x H x W x C (H x W x C) numpy, the
    layout `tiles.Assembler` takes."""
    return logits.movedim(-3, -1).float().cpu().numpy()


def min_input_size(model: nn.Module) -> int:
    """The smallest side `model` takes: 2**depth for our U-Net (each down-step halves it); smp models pad
    to their stride themselves, so any side from 1."""
    return 2**model.depth if isinstance(model, UNet) else 1


def training_side(trained: checkpoint.TrainedModel) -> float | None:
    """The longer side of the frames `trained` saw, as packed: the train split's mean frame where the
    checkpoint records it, else the automatic crop (`data.image_size=0` crops the mean frame, rounded up to
    a multiple of 8) when it is below its cap; None where neither tells (an explicit crop of larger frames),
    and for a model trained on tiles: they were cut at their scenes' own scale, whatever the scenes' size."""
    if trained.tiling:
        return None
    if trained.train_mean_hw:
        return float(max(trained.train_mean_hw))
    crop = trained.train_crop
    if crop and trained.cfg.data.image_size == 0 and max(crop) < AUTO_CROP_MAX:
        return float(max(crop))
    return None


def upsampled_argmax(logits: torch.Tensor, height: int, width: int, band_values: int = BAND_VALUES) -> torch.Tensor:
    """argmax over C of C x h x w `logits` resized bilinearly to `height` x `width` (as F.interpolate with
    align_corners=False), in bands of about `band_values` values: memory stays near C x h x width plus one
    band, whatever `height` is."""
    c, h, w = logits.shape
    if (h, w) == (height, width):
        return logits.argmax(0)
    wide = logits if w == width else F.interpolate(logits[None], size=(h, width), mode="bilinear",
                                                   align_corners=False)[0]
    # PyTorch's source rows for align_corners=False: (y + 0.5) * h / height - 0.5, clamped at 0.
    src = ((torch.arange(height, device=logits.device, dtype=torch.float64) + 0.5) * (h / height) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=h - 1)
    hi = (lo + 1).clamp(max=h - 1)
    frac = (src - lo).to(logits.dtype)[:, None]
    out = torch.empty((height, width), dtype=torch.int64, device=logits.device)
    rows = max(1, band_values // (c * width))
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        out[band] = (wide[:, lo[band]] * (1 - frac[band]) + wide[:, hi[band]] * frac[band]).argmax(0)
    return out


def _colours(given: list[list[int]] | None, num_classes: int) -> np.ndarray:
    """The checkpoint's class colours (the run's pictures drew with them), generated ones for the rest; a
    malformed list is logged and replaced by generated colours: pictures must not stop a prediction."""
    try:
        return palette(num_classes, given)
    except (ValueError, TypeError) as e:
        log.warning("the checkpoint's palette is ignored (expected [r, g, b] in 0..255 per class): %s", e)
        return palette(num_classes)

