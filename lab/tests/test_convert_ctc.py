"""lab/convert_ctc.py on a miniature CTC sequence: 16-bit frames kept byte for byte, instances -> 0/1."""

from __future__ import annotations

import numpy as np
import tifffile
from PIL import Image

from lab import convert_ctc


def _mini_ctc(root, frames=(2, 10, 7), size=(12, 9)):
    (root / "01").mkdir(parents=True)
    (root / "SEG").mkdir()
    rng = np.random.default_rng(0)
    for t in (*frames, 5):  # frame 5 has no mask: left out
        tifffile.imwrite(root / "01" / f"t{t:03d}.tif", rng.integers(33000, 37000, size, dtype=np.uint16))
    for t in frames:
        tifffile.imwrite(root / "SEG" / f"man_seg{t:03d}.tif", rng.integers(0, 300, size).astype(np.uint16))


def test_ctc_conversion_keeps_frames_and_binarises_instances(tmp_path, capsys):
    _mini_ctc(tmp_path / "ctc")
    out = tmp_path / "data"
    args = ["--images", str(tmp_path / "ctc" / "01"), "--seg", str(tmp_path / "ctc" / "SEG"), "--out", str(out)]
    assert convert_ctc.main(args) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["t002.tif", "t007.tif", "t010.tif"]
    assert (out / "images" / "t007.tif").read_bytes() == (tmp_path / "ctc" / "01" / "t007.tif").read_bytes()
    mask = np.array(Image.open(out / "masks" / "t010.png"))
    instances = tifffile.imread(tmp_path / "ctc" / "SEG" / "man_seg010.tif")
    assert mask.dtype == np.uint8 and np.array_equal(mask, (instances > 0).astype(np.uint8))
    # by frame number, not by name: 2, 7 train; the last (10) is val
    assert (out / "splits" / "train.txt").read_text().split() == ["t002", "t007"]
    assert (out / "splits" / "val.txt").read_text().split() == ["t010"]
    capsys.readouterr()
    assert convert_ctc.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err  # nothing replaced without asking
