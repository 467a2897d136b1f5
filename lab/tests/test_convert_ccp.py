"""lab/convert_ccp.py on a miniature CCP layout: folders the packer takes, a fixed split, class names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from lab import convert_ccp

LAB = Path(__file__).resolve().parents[1]


def _mini_ccp(root, n: int = 5):
    (root / "annotations" / "pixel-level").mkdir(parents=True)
    (root / "photos").mkdir()
    names = np.empty((1, 4), dtype=object)
    for i, name in enumerate(["null", "bag", "belt", "skin"]):
        names[0, i] = np.array([name])
    savemat(root / "label_list.mat", {"label_list": names})
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        labels = rng.integers(0, 4, (12, 9), dtype=np.uint8)
        savemat(root / "annotations" / "pixel-level" / f"{i:04d}.mat", {"groundtruth": labels})
        Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(root / "photos" / f"{i:04d}.jpg")
    Image.new("RGB", (9, 12)).save(root / "photos" / "9999.jpg")  # a photo without labels: not converted


def test_ccp_conversion_writes_pairs_a_fixed_split_and_names(tmp_path, capsys):
    _mini_ccp(tmp_path / "ccp")
    out = tmp_path / "data"
    assert convert_ccp.main(["--src", str(tmp_path / "ccp"), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:04d}.jpg" for i in range(1, 6)]
    mask = np.array(Image.open(out / "masks" / "0003.png"))
    from scipy.io import loadmat

    assert np.array_equal(mask, loadmat(tmp_path / "ccp" / "annotations" / "pixel-level" / "0003.mat")["groundtruth"])
    assert (out / "images" / "0002.jpg").read_bytes() == (tmp_path / "ccp" / "photos" / "0002.jpg").read_bytes()
    # 5 samples: all go to train (the first 804 by stem order); val and test stay empty but exist.
    assert (out / "splits" / "train.txt").read_text().split() == ["0001", "0002", "0003", "0004", "0005"]
    assert (out / "splits" / "val.txt").read_text() == "" and (out / "splits" / "test.txt").read_text() == ""
    assert (out / "class_names.txt").read_text().strip() == "background,bag,belt,skin"
    capsys.readouterr()
    assert convert_ccp.main(["--src", str(tmp_path / "ccp"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # nothing replaced without asking


def test_ccp_coarse_label_map_covers_every_class_once():
    from seg_dist.pack import load_label_map

    lut = load_label_map(LAB / "ccp_coarse.yaml", 12, 255)
    assert len(lut) == 59 and lut[0] == 0  # every CCP class is mapped; background stays 0
    assert sorted(set(lut.tolist())) == list(range(12))  # and every coarse class receives at least one
