"""Export a checkpoint to TorchScript or ONNX, checked against the eager model on odd sizes.

    python -m seg_dist.export --checkpoint runs/X/checkpoints/best.pt --format onnx --out model.onnx
    seg-dist export --checkpoint best.pt --format torchscript --out model.pt [--normalize json] [--overwrite]

The file takes N x C x H x W images of the checkpoint's channels, of any batch, height and width (at least
2**depth), and returns logits N x K x H x W. `--normalize inside` (the default): the input is the pixels
as trained, in their own type (uint8 0-255, uint16 0-65535, float32 as stored; `--input-dtype float32`
takes the same values as floats, which TorchScript always accepts) and the checkpoint's mean/std are applied
in the graph. `--normalize json`: the bare model, fed (x * scale - mean) / std by the caller. Either way
`<out>.json` beside it holds the class names, ignore index, the input (channels, dtype, mean, std in the
type's full scale, raw_mean, raw_std in pixel values, and the graph's `tensor_dtype`), the layout and
`max_size`, the scale to bring images to first (pack --max-size; null: none).

Before the file is renamed into place, the exported and eager models run on random images of the
checkpoint's kind (channels and pixel type) at two odd sizes; a max abs diff above the tolerance fails
(exit 1) and leaves nothing. ONNX needs `pip install 'seg_dist[export]'` (onnx, onnxscript; onnxruntime for the check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli, exporting


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=exporting.FORMATS)
    p.add_argument("--out", required=True, help="the model file; its metadata goes to <out>.json")
    p.add_argument("--normalize", default="inside", choices=exporting.NORMALIZE,
                   help="inside: raw pixels normalised in the graph (default); json: the bare model")
    p.add_argument("--input-dtype", default="auto", choices=exporting.INPUT_DTYPES,
                   help="with --normalize inside: the graph's input dtype; auto (default): the checkpoint's pixel "
                        "type; float32: the same values as floats")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's exporter's)")
    p.add_argument("--device", default="cpu", help="where the model is loaded and exported (the check runs on CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and <out>.json")
    return p.parse_args(argv)


def _export(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    result = exporting.export(args.checkpoint, args.out, args.format, args.normalize, opset=args.opset,
                              input_dtype=args.input_dtype, device=args.device, overwrite=args.overwrite)
    opset = f", opset {result.opset}" if result.opset is not None else ""
    print(f"{args.checkpoint} -> {result.out} ({args.format}{opset}, normalize {args.normalize}), "
          f"metadata {result.metadata}")
    print(result.check.summary())
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_export, argv)


if __name__ == "__main__":
    sys.exit(main())
