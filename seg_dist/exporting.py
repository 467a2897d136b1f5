"""A checkpoint as a deployable TorchScript or ONNX file, checked against the eager model.

`export()` loads a checkpoint (`checkpoint.load_model`), wraps its model in `ExportUNet` (model.name=unet)
or `ExportSmp` (model.name=smp and smp_unet), optionally with the run's normalisation inside the graph, writes the
file under a temporary name, runs the exported file and the eager model on random images of two odd sizes,
and only then renames it to `out` and writes `<out>.json` beside it: class names, ignore index, the input
(channels, pixel type, mean/std in the type's full scale and in raw pixel values), the layout and the
packing scale (`max_size`), what a deployer needs to feed the file and read its output.

The graph takes the pixels of the checkpoint's input in their own type (`checkpoint.input_contract`):
uint8, uint16 or float32 tensors of its channel count. torch's exporters both take uint16 inputs (checked
with torch 2.13: TorchScript scripts `x.to(float32)` from any integer type, and the torch.export-based
ONNX exporter declares a `tensor(uint16)` input that onnxruntime runs); where an ONNX export with a uint16
input fails (older torch or onnxscript), the input falls back to float32 holding the same values 0-65535,
with a warning, and the JSON's `input.tensor_dtype` says which the file takes (`--input-dtype float32`
asks for that fallback).

Why a wrapper instead of the model itself: `UNet.forward` cannot be scripted (an f-string over a
shape tuple) and `Up.forward` pads only `if dh or dw`, a branch that `torch.jit.trace` bakes in for
the traced size and that `torch.export` turns into a guard on H % 2. `ExportUNet` calls the same
submodules (same weights, same arithmetic) but always pads, by amounts that are zero where nothing
is missing, so the graph has no shape branch and height, width and batch stay dynamic.
`SmpSegmenter.forward` has the same kind of branch (it pads to the encoder stride only `if ph or pw`);
`ExportSmp` always pads (zero where the side is already a multiple) and always crops, around the same
smp module. Checked with smp 0.6.0 on small encoders: TorchScript scripts all architectures but those smp
marks unscriptable (UnetPlusPlus, DPT); ONNX, through torch.export with symbolic height and width, all but
those that pool to fixed grids (PSPNet, UPerNet), whose gathers keep the traced size. Both are refused in
one line naming the other format (`_smp_cannot`), and a file that fails to run at the check's sizes fails
the check. Activation checkpointing is switched off in the exported module (it only acts in training, and
TorchScript cannot script it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import atomic, checkpoint, distributed, outputs
from .data import Normalization
from .errors import RunFailed, UserError
from .models import SmpSegmenter, checkpointing
from .models.unet import UNet, UNetPass
from .shards import FULL_SCALE

__all__ = [
    "ATOL", "FORMATS", "INPUT_DTYPES", "MODEL_FIELDS", "NORMALIZE", "RTOL", "CheckResult", "ExportResult",
    "ExportSmp", "ExportUNet", "check_sizes", "export", "export_module", "metadata_path", "model_fields",
]

FORMATS = ("torchscript", "onnx")
NORMALIZE = ("inside", "json")  # normalisation in the graph, or described in the JSON for the caller
# The graph input with normalisation inside (ONNX inputs have one dtype): auto is the checkpoint's pixel type;
# float32 takes the same pixel values as floats (the fallback where an exporter lacks the integer type).
INPUT_DTYPES = ("auto", "uint8", "uint16", "float32")
# fp32 on the CPU: max |exported - eager| <= ATOL + RTOL * max |eager|. Measured: 0 for TorchScript (the
# same kernels), ~2e-6 for onnxruntime on width 8..64 U-Nets; the relative part is for large trained logits.
ATOL = 1e-4
RTOL = 1e-5
MIN_ARGMAX_AGREEMENT = 0.999  # a near-tie within the tolerance may flip a pixel's class, nothing more
EXPORT_HINT = "pip install 'seg_dist[export]'"
INPUT_NAME, OUTPUT_NAME = "image", "logits"

log = logging.getLogger(__name__)


class ExportUNet(UNetPass):
    """`UNet.forward` without shape branches, optionally preceded by the training normalisation.

    With `normalize`, the input is an image batch N x C x H x W of raw pixel values (uint8, uint16 or float
    tensors) and is normalised as `data.normalize` does: (x - F mean) / (F std), with `full_scale` F of the
    pixel type (255, 65535 or 1); without it, the input is the already normalised float batch the bare
    model takes.
    """

    def __init__(self, unet: UNet, mean: tuple[float, ...], std: tuple[float, ...], normalize: bool,
                 full_scale: float = 255.0) -> None:
        super().__init__()
        self.normalize = normalize
        self.min_size = 2**unet.depth
        # The submodules themselves (shared weights), not the `Up` blocks, whose forward has the branch.
        self.inc = unet.inc
        self.downs = unet.downs
        self.ups = nn.ModuleList(_UpStep(up) for up in unet.ups)
        self.head = unet.head
        offset, inv_scale = _normalisation_buffers(mean, std, full_scale)
        self.register_buffer("offset", offset)
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2] < self.min_size or image.shape[-1] < self.min_size:
            raise ValueError("input height and width must be at least 2**depth (min_size in the JSON)")
        x = (image.to(torch.float32) - self.offset) * self.inv_scale if self.normalize else image
        return self.encode_decode(x)


class _UpStep(nn.Module):
    """`Up.forward` with the pad unconditional (a zero pad where nothing is missing): same output."""

    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        self.up = up.up
        self.conv = up.conv

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # MaxPool floors odd sizes, so the upsampled map can be 1 px short of the skip per level.
        dh = skip.shape[-2] - x.shape[-2]
        dw = skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class ExportSmp(nn.Module):
    """`SmpSegmenter.forward` without its shape branch, optionally preceded by the training normalisation
    (the input convention of `ExportUNet`). The input is normalised first and then zero-padded at the
    bottom/right to the next multiple of the encoder stride, as the eager model pads its (normalised)
    input, so the output is the eager one; `min_size` is the stride, the smallest side the graph accepts."""

    def __init__(self, segmenter: SmpSegmenter, mean: tuple[float, ...], std: tuple[float, ...],
                 normalize: bool, full_scale: float = 255.0) -> None:
        super().__init__()
        self.normalize = normalize
        self.stride = int(segmenter.stride)
        self.min_size = self.stride
        self.smp = segmenter.smp  # the smp module itself (shared weights)
        offset, inv_scale = _normalisation_buffers(mean, std, full_scale)
        self.register_buffer("offset", offset)
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2] < self.min_size or image.shape[-1] < self.min_size:
            raise ValueError("input height and width must be at least the encoder stride (min_size in the JSON)")
        x = (image.to(torch.float32) - self.offset) * self.inv_scale if self.normalize else image
        h = x.shape[-2]
        w = x.shape[-1]
        # (s - h % s) % s, not -h % s: the same amount, in arithmetic every exporter keeps symbolic.
        ph = (self.stride - h % self.stride) % self.stride
        pw = (self.stride - w % self.stride) % self.stride
        x = F.pad(x, [0, pw, 0, ph])
        return self.smp(x)[:, :, :h, :w]


def _normalisation_buffers(mean: tuple[float, ...], std: tuple[float, ...], full_scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x C x 1 x 1 offset F mean and scale 1 / (F std), rounded to float32 from float64 as `data.normalize`
    makes its constants, so the graph's arithmetic is the eager path's."""
    shape = (1, len(mean), 1, 1)
    offset = torch.tensor([full_scale * m for m in mean], dtype=torch.float32).reshape(shape)
    inv_scale = torch.tensor([1.0 / (full_scale * s) for s in std], dtype=torch.float32).reshape(shape)
    return offset, inv_scale


def export_module(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                  normalize: bool, full_scale: float = 255.0) -> ExportUNet | ExportSmp:
    """The export wrapper for a trained model (our U-Net or an smp model), sharing its weights; with
    `normalize`, the graph takes raw pixels of a type whose full scale is `full_scale` (255, 65535, 1)."""
    checkpointing.disable(model)
    if isinstance(model, UNet):
        return ExportUNet(model, mean, std, normalize, full_scale)
    if isinstance(model, SmpSegmenter):
        return ExportSmp(model, mean, std, normalize, full_scale)
    raise TypeError(f"no export wrapper for {type(model).__name__}")


def _smp_cannot(segmenter: SmpSegmenter, fmt: str) -> str | None:
    """Why `fmt` cannot hold this smp model (smp marks each architecture and encoder), or None."""
    flag, able, other = (("_is_torch_scriptable", "scriptable", "onnx") if fmt == "torchscript"
                         else ("_is_torch_exportable", "exportable", "torchscript"))
    arch = f"model.arch={type(segmenter.smp).__name__}"
    for part, what in ((segmenter.smp, arch),
                       (segmenter.smp.encoder, f"its encoder ({type(segmenter.smp.encoder).__name__})")):
        if not getattr(part, flag, True):
            return f"smp marks {what} as not {able}; try --format {other}"
    if fmt == "onnx":
        # Pooling to a fixed grid (PSPNet's and UPerNet's pyramid pooling: 2 x 2, 3 x 3, 6 x 6) exports as
        # gathers whose indices hold the traced size: the file fails at any other size (checked with torch
        # 2.14.1 and onnxruntime 1.32). Global pooling (1 x 1) exports as a mean and is fine.
        grids = {tuple(_pair(m.output_size)) for m in segmenter.smp.modules()
                 if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))} - {(1, 1)}
        if grids:
            return (f"{arch} pools to fixed grids ({', '.join('x'.join(map(str, g)) for g in sorted(grids))}), "
                    "which ONNX cannot follow at dynamic sizes; use --format torchscript")
    return None


def _pair(size: Any) -> tuple[Any, Any]:
    return (size, size) if not isinstance(size, (tuple, list)) else (size[0], size[1])


@dataclass
class CheckResult:
    """Exported vs eager on random images; `skipped` says why there are no figures."""

    shapes: list[list[int]]
    max_abs_diff: float | None = None
    tolerance: float | None = None
    argmax_agreement: float | None = None
    skipped: str | None = None
    error: str | None = None  # the exported file failed to run at one of the shapes

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        return self.skipped is not None or (self.max_abs_diff is not None and self.tolerance is not None
                                            and self.argmax_agreement is not None
                                            and self.max_abs_diff <= self.tolerance
                                            and self.argmax_agreement >= MIN_ARGMAX_AGREEMENT)

    def summary(self) -> str:
        sizes = ", ".join("x".join(map(str, s)) for s in self.shapes)
        if self.skipped:
            return f"check skipped ({sizes}): {self.skipped}"
        if self.error:
            return f"check {sizes}: the exported file failed to run: {self.error}"
        return (f"check {sizes}: max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
                f"argmax agreement {100 * (self.argmax_agreement or 0):.3f}% (needs {100 * MIN_ARGMAX_AGREEMENT:g}%)")


@dataclass
class ExportResult:
    out: Path
    metadata: Path
    check: CheckResult
    opset: int | None


def metadata_path(out: str | Path) -> Path:
    """`model.onnx` -> `model.onnx.json` (never the model file itself, whatever its suffix)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_sizes(depth: int) -> list[tuple[int, int, int]]:
    """(batch, H, W) of the check: odd sizes; the first one pads at every level, the second one
    differs in every dimension (batch too), so a graph with a baked-in shape fails it."""
    s = 2**depth
    return [(1, 3 * s - 1, 4 * s - 1), (2, 5 * s + 1, 2 * s + 1)]


def missing_onnx_exporter() -> str | None:
    """The one-line reason torch's ONNX exporter cannot run here, or None."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"--format onnx needs {' and '.join(missing)} (torch's exporter uses them): {EXPORT_HINT}"
    return None


def export(
    checkpoint_path: str | Path,
    out: str | Path,
    fmt: str,
    normalize: str = "inside",
    *,
    opset: int | None = None,
    input_dtype: str = "auto",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    seed: int = 0,
) -> ExportResult:
    """Export, check, then rename into place; nothing is left at `out` when any step fails."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if normalize not in NORMALIZE:
        raise UserError(f"--normalize {normalize!r}: choose one of {', '.join(NORMALIZE)}")
    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"--input-dtype {input_dtype!r}: choose one of {', '.join(INPUT_DTYPES)}")
    out, meta = Path(out), metadata_path(out)
    outputs.check([outputs.Input(Path(checkpoint_path), "the checkpoint being exported",
                                 f"--checkpoint {checkpoint_path}")],
                  [outputs.Output(out, "the exported model", f"--out {out}"),
                   outputs.Output(meta, "the exported model's metadata JSON", f"--out {out}")], overwrite=overwrite)
    if fmt == "onnx" and (reason := missing_onnx_exporter()):
        raise UserError(reason)

    device = distributed.named_device(device)
    trained = checkpoint.load_model(checkpoint_path, device)
    if not isinstance(trained.model, (UNet, SmpSegmenter)):
        raise UserError(f"{checkpoint_path}: export supports model.name=unet and smp, "
                        f"not {trained.cfg.model.name!r}")
    if isinstance(trained.model, SmpSegmenter) and (reason := _smp_cannot(trained.model, fmt)):
        raise UserError(f"{checkpoint_path}: --format {fmt}: {reason}")
    contract = trained.input
    mean, std = contract.mean, contract.std
    in_channels = trained.model.in_channels if isinstance(trained.model, UNet) else trained.cfg.model.in_channels
    if in_channels != contract.channels:
        raise UserError(f"{checkpoint_path}: the model takes {in_channels} channels, its input entry says "
                        f"{contract.channels}")
    if input_dtype not in ("auto", contract.dtype, "float32"):
        raise UserError(f"--input-dtype {input_dtype}: the model was trained on {contract.dtype} pixels; give "
                        f"{contract.dtype} (the default, auto) or float32 (the same values as floats)")
    full_scale = FULL_SCALE[contract.dtype]
    module = export_module(trained.model, mean, std, normalize == "inside", full_scale).to(device).eval()
    wanted = contract.dtype if input_dtype == "auto" else input_dtype
    dtype = getattr(torch, wanted) if normalize == "inside" else torch.float32
    fallback = None

    out.parent.mkdir(parents=True, exist_ok=True)
    with _staged(out) as tmp:
        opset_used = None
        if fmt == "torchscript":
            _export_torchscript(module, tmp)
        else:
            try:
                opset_used = _export_onnx(module, tmp, dtype, device, opset)
            except RunFailed as e:
                if dtype != torch.uint16:
                    raise
                fallback = (f"uint16 pixels as float32 values (0-65535): this torch's ONNX exporter could not "
                            f"take a uint16 input ({e})")
                log.warning("ONNX export with a uint16 input failed (%s); the file takes float32 values 0-65535 "
                            "instead (see input.tensor_dtype in the JSON)", e)
                dtype = torch.float32
                opset_used = _export_onnx(module, tmp, dtype, device, opset)
        check = _check(trained.model, module, tmp, fmt, dtype, contract, seed)
        if not check.ok:
            raise RunFailed(f"{out}: the exported model does not match the eager one: {check.summary()}; "
                            "nothing written")
    info = _metadata(trained, checkpoint_path, out, fmt, normalize, str(dtype).removeprefix("torch."),
                     module.min_size, opset_used, check, fallback)
    atomic.write_text(meta, outputs.json_text(info, indent=2) + "\n")
    return ExportResult(out, meta, check, opset_used)


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling that becomes `out` (fsync, rename, directory fsync) when the block succeeds
    and is removed when it raises: the exporters write to a path, so `atomic.writer` does not fit."""
    tmp = atomic.temp_path(out)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    atomic.fsync_dir(out.parent)


def _export_torchscript(module: ExportUNet | ExportSmp, path: Path) -> None:
    # script, not trace: the graph keeps shape arithmetic (pad amounts, the min-size check) symbolic.
    # torch 2.13 marks torch.jit deprecated (a warning per call; torch 2.14's load warns with a FutureWarning);
    # it still works, and TorchScript is what C++ (libtorch) and older runtimes load, so the notice is left
    # to the report, not each run. smp's U-Net scripts too (checked with torch 2.14.1, smp 0.6.0).
    with _quiet(DeprecationWarning, FutureWarning):
        torch.jit.save(torch.jit.script(module), str(path))


@contextlib.contextmanager
def _quiet(*categories: type[Warning]) -> Iterator[None]:
    with warnings.catch_warnings():
        for category in categories:
            warnings.simplefilter("ignore", category)
        yield


def _export_onnx(module: ExportUNet | ExportSmp, path: Path, dtype: torch.dtype, device: torch.device,
                 opset: int | None) -> int:
    """torch.export-based exporter (torch's default since 2.9; the TorchScript one is deprecated)."""
    from torch.export import Dim

    # Batch 2 in the example: torch.export specialises a dimension whose example size is 1.
    _, h, w = check_sizes(_depth(module))[0]
    s = module.min_size
    example = torch.randint(0, 256, (2, module.offset.shape[1], h, w), device=device).to(dtype)
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=s), 3: Dim("width", min=s)}
    with _quiet_exporter():
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes={INPUT_NAME: dims},
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=opset, verbose=False)
        except Exception as e:  # the exporter's errors run to pages; keep the first line (chained for debugging)
            raise RunFailed(f"ONNX export failed: {type(e).__name__}: {_first_line(e)}") from e
        # One self-contained file (the weights inside); external data is only needed past protobuf's 2 GB.
        program.save(str(path), external_data=False)
    return next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))


def _depth(module: ExportUNet | ExportSmp) -> int:
    """log2 of the minimum side: the U-Net's depth, or 5 for an smp encoder of stride 32."""
    return module.min_size.bit_length() - 1


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision op and emits internal deprecation warnings:
    noise to a user of this command, who can do nothing about either."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _quiet(DeprecationWarning, FutureWarning):
            yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def check_images(n: int, h: int, w: int, contract: Normalization, gen: torch.Generator) -> torch.Tensor:
    """N x H x W x C random images of the checkpoint's kind: uint8 uniform over 0-255; uint16 and float32
    around the training pixels (raw mean +- 2 raw std, clipped to the type's range), where a trained model
    gives the logits it was made for."""
    c = contract.channels
    if contract.dtype == "uint8":
        return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=gen)
    full = FULL_SCALE[contract.dtype]
    mean = torch.tensor([m * full for m in contract.mean], dtype=torch.float64)
    spread = torch.tensor([max(s * full, 1e-6) for s in contract.std], dtype=torch.float64)
    x = mean + 2 * spread * torch.randn((n, h, w, c), dtype=torch.float64, generator=gen)
    if contract.dtype == "uint16":
        return x.round().clamp(0, 65535).to(torch.int32).to(torch.uint16)
    return x.to(torch.float32)


def _check(unet: nn.Module, module: ExportUNet | ExportSmp, path: Path, fmt: str, dtype: torch.dtype,
           contract: Normalization, seed: int) -> CheckResult:
    """Eager reference: the bare model on images of the recorded kind (`check_images`) normalised by
    `data.preprocess` (the training path), so normalisation inside the graph is checked too; the graph
    takes the same pixels as `dtype`. Everything runs on the CPU in fp32."""
    from .config import DataConfig
    from .data import preprocess

    mean, std = contract.mean, contract.std
    shapes = [[n, contract.channels, h, w] for n, h, w in check_sizes(_depth(module))]
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return CheckResult(shapes, skipped=f"onnxruntime is not installed: {EXPORT_HINT} to check the ONNX file")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    else:
        with _quiet(DeprecationWarning, FutureWarning):
            scripted = torch.jit.load(str(path), map_location="cpu")

        def run(x: torch.Tensor) -> torch.Tensor:
            return scripted(x)

    reference = unet if next(unet.parameters()).device.type == "cpu" else copy.deepcopy(unet).cpu()
    data_cfg = DataConfig(mean=list(mean), std=list(std))
    gen = torch.Generator().manual_seed(seed)
    worst, bound, agree, total = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for n, _, h, w in shapes:
            images = check_images(n, h, w, contract, gen)
            normalised = torch.stack([preprocess(np.ascontiguousarray(im.numpy()), data_cfg) for im in images])
            eager = reference(normalised)  # UNet/SmpSegmenter.forward itself, branches and all
            raw = images.permute(0, 3, 1, 2).contiguous().to(dtype)
            try:
                got = run(raw if module.normalize else normalised).float()
            except Exception as e:  # a graph that only runs at the size it was traced at, say
                return CheckResult(shapes, error=f"at {n}x{contract.channels}x{h}x{w}: {type(e).__name__}: "
                                                 f"{_first_line(e)[:300]}")
            if got.shape != eager.shape:
                return CheckResult(shapes, max_abs_diff=float("inf"), tolerance=ATOL, argmax_agreement=0.0)
            worst = max(worst, (got - eager).abs().max().item())
            bound = max(bound, eager.abs().max().item())
            agree += (got.argmax(1) == eager.argmax(1)).sum().item()
            total += got.shape[0] * got.shape[2] * got.shape[3]
    return CheckResult(shapes, max_abs_diff=worst, tolerance=ATOL + RTOL * bound, argmax_agreement=agree / total)


# The model.* keys that describe each exported architecture. Training-only keys (encoder_weights,
# freeze_encoder_epochs) and keys of other models (a plain unet has no encoder) are left out.
MODEL_FIELDS = {
    "unet": ("name", "in_channels", "width", "depth", "bilinear", "norm"),
    "smp": ("name", "arch", "in_channels", "encoder"),
    "smp_unet": ("name", "in_channels", "encoder"),  # smp's Unet, as checkpoints from before model.arch say
}


def model_fields(model_cfg: Any) -> dict[str, Any]:
    """The `model` section of the export JSON: only the keys that apply to `model_cfg.name`."""
    return {key: getattr(model_cfg, key) for key in MODEL_FIELDS[model_cfg.name]}


def _metadata(trained: checkpoint.TrainedModel, checkpoint_path: str | Path, out: Path, fmt: str,
              normalize: str, tensor_dtype: str, min_size: int, opset: int | None, check: CheckResult,
              fallback: str | None = None) -> dict[str, Any]:
    inside = normalize == "inside"
    contract = trained.input
    full = FULL_SCALE[contract.dtype]
    limits = {"uint8": "0-255", "uint16": "0-65535", "float32": "as stored"}[contract.dtype]
    norm = contract.to_dict()
    info: dict[str, Any] = {
        "file": out.name,
        "format": fmt,
        **({"opset": opset} if fmt == "onnx" else {}),
        "normalize": normalize,
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            # The images the model trained on: channels in the training images' order, their pixel type, and
            # the normalisation (x - raw_mean) / raw_std per channel (raw: pixel values; mean/std: in the
            # type's full scale, raw / 255, / 65535, or as stored for float32).
            "channels": contract.channels,
            "dtype": contract.dtype,
            # What the mean and std come from: the manifest, data.mean/std, or the pretrained weights' own.
            "source": contract.source,
            "mean": norm["mean"],
            "std": norm["std"],
            "raw_mean": norm["raw_mean"],
            "raw_std": norm["raw_std"],
            # What the graph's input tensor holds.
            "tensor_dtype": tensor_dtype,
            **({"tensor_note": fallback} if fallback else {}),
            "range": (f"{contract.dtype} pixel values {limits} (normalised inside the graph)" if inside
                      else "normalised: (x * scale - mean) / std"),
            "dynamic": ["batch", "height", "width"],
            "min_size": min_size,  # height and width at least 2**depth / the smp stride (any size above)
        },
        "output": {"name": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32", "what": "logits; argmax over C"},
        # The training normalisation: pixels x -> (x * scale - mean) / std per channel, scale = 1 / full scale.
        "scale": 1 / full,
        "mean": list(contract.mean),
        "std": list(contract.std),
        "num_classes": trained.num_classes,
        "class_names": trained.class_names,
        "ignore_index": trained.ignore_index,
        # The scale the model trained at (pack --max-size): an image whose longer side exceeds it is scaled
        # down so that side is max_size (each side rounded, at least 1; bilinear), as seg_dist.predict does,
        # and the logits resized back to the image before the argmax. null: images run at their own size.
        "max_size": trained.max_size,
        "model": model_fields(trained.cfg.model),
        "checkpoint": str(checkpoint_path),
        "global_step": trained.global_step,
        # The figures of a check that ran, or why it did not.
        "check": {key: value for key, value in asdict(check).items() if value is not None},
        "versions": checkpoint.versions(),
    }
    return info
