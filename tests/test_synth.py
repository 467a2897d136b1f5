"""seg_dist.synthetic (deterministic, multi-class, imbalanced, palette-PNG masks) and its command seg_dist.synth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg_dist import synth, synthetic


def _masks(root: Path) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in sorted((root / "masks").glob("*.png"))]


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "a", n=6, size=32, seed=3)
    synthetic.generate(tmp_path / "b", n=6, size=32, seed=3)
    synthetic.generate(tmp_path / "c", n=6, size=32, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 12
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a/images/synth_00000.jpg").read_bytes() != (tmp_path / "c/images/synth_00000.jpg").read_bytes()
    # Sample i does not depend on how many samples are generated.
    image, label = synthetic.render(5, size=32, seed=3)
    assert np.array_equal(label, _masks(tmp_path / "a")[5])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_classes_imbalance_and_mask_format(tmp_path: Path) -> None:
    synthetic.generate(tmp_path, n=120, size=64, seed=0)
    assert len(synthetic.CLASS_NAMES) >= 6 and len(synthetic.PALETTE) == len(synthetic.CLASS_NAMES)
    first = Image.open(tmp_path / "masks/synth_00000.png")
    assert first.mode == "P" and first.size == (64, 64)
    assert tuple(first.getpalette()[3:6]) == synthetic.PALETTE[1]
    image = Image.open(tmp_path / "images/synth_00000.jpg")
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)

    masks = np.stack(_masks(tmp_path))
    values = set(np.unique(masks).tolist())
    assert values <= set(range(len(synthetic.CLASS_NAMES))) | {synthetic.IGNORE_INDEX}
    counts = np.bincount(masks[masks != synthetic.IGNORE_INDEX], minlength=len(synthetic.CLASS_NAMES))
    share = counts / counts.sum()
    assert (counts > 0).all()  # every class occurs
    assert share[0] > 0.6  # background dominates
    assert share[1:].min() < share[1:].max() / 4  # one foreground class is rare
    assert 0 < (masks == synthetic.IGNORE_INDEX).mean() < 0.05  # thin ignore band only


def test_cli_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth.main(["--out", str(tmp_path), "--n", "3", "--size", "16"]) == 0
    assert synth.main(["--out", str(tmp_path), "--n", "2", "--size", "16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert synth.main(["--out", str(tmp_path), "--n", "2", "--size", "16", "--overwrite"]) == 0
    assert len(list((tmp_path / "images").iterdir())) == 2 and len(list((tmp_path / "masks").iterdir())) == 2
