import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import png_bytes
from PIL import Image

from seg_dist import preview
from seg_dist.config import load_config
from seg_dist.data import preprocess
from seg_dist.visualize import (
    IGNORE_COLOUR,
    colorize,
    confusion_matrix_figure,
    denormalize,
    grid,
    overlay,
    overlay_triptych,
    palette,
    save_png,
)


def test_palette_is_fixed_and_class_0_is_a_colour():
    p = palette(40)
    assert p.shape == (40, 3) and p.dtype == np.uint8
    assert p[0].sum() > 200 and tuple(p[0]) != IGNORE_COLOUR  # class 0 is no dark wash
    assert len({tuple(c) for c in p}) == 40
    assert np.array_equal(palette(40), p) and np.array_equal(palette(6), p[:6])


def test_colorize_and_overlay():
    mask = np.array([[0, 1], [2, 255]])
    c = colorize(mask, 3, 255)
    assert c.shape == (2, 2, 3) and c.dtype == np.uint8
    assert np.array_equal(c[0, 0], palette(3)[0]) and np.array_equal(c[1, 0], palette(3)[2])
    assert np.array_equal(c[1, 1], IGNORE_COLOUR)
    assert np.array_equal(colorize(torch.from_numpy(mask), 3), c)
    image = np.full((2, 2, 3), 100, np.uint8)
    assert np.array_equal(overlay(image, mask, 3, alpha=0.0), image)
    assert np.array_equal(overlay(image, mask, 3, alpha=1.0), c)
    assert overlay_triptych(image, mask, mask, 3).shape == (2 + 4, 3 * 2 + 8, 3)
    with pytest.raises(ValueError):
        overlay(np.zeros((3, 2, 3), np.uint8), mask, 3)


def test_denormalize_inverts_preprocess():
    cfg = load_config(None, ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"])
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = denormalize(preprocess(image, cfg.data), cfg.data.mean, cfg.data.std)
    assert back.dtype == np.uint8 and np.abs(back.astype(int) - image).max() <= 1
    # 16-bit bands come back in 16 bits: the full scale is 65535, not 255.
    cfg = load_config(None, ["data.mean=[0.06,0.5,0.3,0.9]", "data.std=[0.01,0.2,0.1,0.05]"])
    deep = np.random.default_rng(1).integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    back = denormalize(preprocess(deep, cfg.data), cfg.data.mean, cfg.data.std, "uint16")
    assert back.dtype == np.uint16 and back.shape == deep.shape and np.abs(back.astype(int) - deep).max() <= 1


def test_grid_layout():
    tiles = [np.full((4, 6, 3), i, np.uint8) for i in range(5)] + [np.zeros((2, 3), np.uint8)]
    g = grid(tiles, cols=4, pad=1, fill=255)
    assert g.shape == (2 * 4 + 3, 4 * 6 + 5, 3)
    assert (g[1:5, 1:7] == 0).all() and (g[1:5, 8:14] == 1).all() and (g[6:10, 1:7] == 4).all()
    assert (g[0] == 255).all()


def test_save_png_is_atomic_and_round_trips(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = tmp_path / "sub" / "x.png"
    save_png(out, a)
    save_png(out, a)  # replaces
    with Image.open(out) as im:
        assert np.array_equal(np.array(im), a)
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp files left behind
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", a.astype(np.float32))


@pytest.fixture()
def shard_root(tmp_path):
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i}", "png": png_bytes(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)),
                        "mask.png": png_bytes(rng.integers(0, 4, (40, 36), dtype=np.uint8))})
    manifest = {"format": "seg_dist-shards/1", "num_classes": 4, "ignore_index": 255, "class_names": list("abcd"),
                "splits": {"train": {"num_samples": 6, "shards": [{"name": "train-000000.tar", "num_samples": 6}],
                                     "class_histogram": [0, 0, 0, 0], "image_size": {}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _augmented(shard_root, n, *overrides):
    """The samples preview draws: the training pipeline's, seeded alike in any process."""
    from seg_dist import data, shards

    cfg = load_config(None, [f"data.root={shard_root}", *overrides])
    return list(data.augmented_samples(cfg, shards.load_manifest(shard_root), n, "train", 0))


def _find(picture, tile):
    """(y, x) where `tile` appears whole in `picture`, enlarged by the smallest integer factor that makes it
    appear; None if it is nowhere."""
    for k in range(1, 9):
        big = np.repeat(np.repeat(tile, k, axis=0), k, axis=1)
        h, w = big.shape[:2]
        ys, xs = np.nonzero((picture[: picture.shape[0] - h + 1, : picture.shape[1] - w + 1] == big[0, 0]).all(-1))
        for y, x in zip(ys, xs, strict=True):
            if np.array_equal(picture[y : y + h, x : x + w], big):
                return int(y), int(x)
    return None


def test_preview_writes_a_grid(shard_root, tmp_path):
    colours = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]]  # the dataset's own (pack --palette)
    manifest = json.loads((shard_root / "manifest.json").read_text())
    (shard_root / "manifest.json").write_text(json.dumps({**manifest, "palette": colours}))
    out = tmp_path / "p.png"
    rc = preview.main(["--out", str(out), "--n", "5", "--cols", "2", f"data.root={shard_root}",
                       "data.image_size=32", "data.augment.affine=1.0"])
    assert rc == 0
    with Image.open(out) as f:
        im = np.array(f)
    samples = _augmented(shard_root, 5, "data.image_size=32", "data.augment.affine=1.0")
    # Each sample's image, enlarged alike, in rows of 2 (titles above each row), left to right.
    spots = [_find(im, rgb) for rgb, _ in samples]
    assert None not in spots
    (y0, x0), (y1, x1), (y2, x2), (y3, x3), (y4, x4) = spots
    assert y0 == y1 < y2 == y3 < y4 and x0 == x2 == x4 < x1 == x3 and y0 > 10  # a title row above the first
    # The legend below the last row shows each class present in the dataset's own colours.
    below = im[y4 + (y2 - y0) - 10 :].reshape(-1, 3)
    present = sorted({int(c) for _, m in samples for c in np.unique(m) if c < 4})  # 255: ignored (the affine fill)
    shown = {tuple(c) for c in below}
    assert present and all(tuple(colours[c]) in shown for c in present)
def test_preview_errors_are_one_line(tmp_path, capsys):
    assert preview.main(["--out", str(tmp_path / "p.png"), f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and err.count("\n") == 1
    assert preview.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_preview_module_runs(shard_root, tmp_path):
    out = tmp_path / "cli.png"
    r = subprocess.run([sys.executable, "-m", "seg_dist.preview", "--out", str(out), "--n", "2",
                        f"data.root={shard_root}", "data.image_size=32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (2 samples of split 'train')" in r.stdout
    with Image.open(out) as f:
        im = np.array(f)
    # 2 samples side by side (cols = ceil(sqrt(2))), each as image | labels: the mask really drawn over it in
    # the generated colours (the manifest has no palette).
    (rgb0, mask0), (rgb1, _) = _augmented(shard_root, 2, "data.image_size=32")
    (y0, x0), (y1, x1) = _find(im, rgb0), _find(im, rgb1)
    k = (x1 - x0) // (2 * 32)  # the enlargement: two panels per sample
    labels = overlay(np.repeat(np.repeat(rgb0, k, 0), k, 1), np.repeat(np.repeat(mask0, k, 0), k, 1), 4, 255,
                     colours=palette(4))
    ym, xm = _find(im, labels)
    assert y0 == ym == y1 and x0 < xm < x1
    assert np.abs(labels.astype(int) - np.repeat(np.repeat(rgb0, k, 0), k, 1)).mean() > 5
    # Titles above the row, a legend of the classes shown below it.
    assert (im[: y0 - 2] < 128).all(-1).any()  # dark title text
    legend = {tuple(c) for c in im[y0 + 32 * k :].reshape(-1, 3)}
    assert all(tuple(palette(4)[c]) in legend for c in np.unique(mask0) if c < 4)

def test_enlarge_repeats_pixels():
    from seg_dist.visualize import enlarge

    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = enlarge(img, min_side=5)  # factor 3
    assert big.shape == (6, 9, 3)
    assert (big[::3, ::3] == img).all() and (big[2, 8] == img[0, 2]).all()
    assert enlarge(img, min_side=2) is img


def _pixels_of(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(y, x) of every pixel of exactly `colour`."""
    return np.argwhere((img == np.array(colour, np.uint8)).all(axis=2))


def test_confusion_matrix_figure_shades_rows_by_target_share() -> None:
    from seg_dist.visualize import _shade

    mat = np.array([[5, 5, 0], [0, 0, 0], [0, 1, 9]])
    img = confusion_matrix_figure(torch.as_tensor(mat), ["background", "cat", "dog"])
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    half, tenth, most = (_pixels_of(img, _shade(v)) for v in (0.5, 0.1, 0.9))
    # Row 0 splits 50/50, row 2 is 10% / 90%: each shade is drawn, as a whole cell, not a speck.
    assert len(half) > 2 * 100 and len(tenth) > 100 and len(most) > 100
    # Rows are targets (top to bottom), columns predictions (left to right); medians, as anti-aliased
    # digits inside the cells may hit a shade by chance.
    y, x = 0, 1
    assert np.median(half[:, y]) + 20 < np.median(most[:, y])  # row 0 above row 2
    assert np.median(tenth[:, x]) + 20 < np.median(most[:, x])  # column 1 left of column 2
    assert np.median(half[:, x]) + 10 < np.median(tenth[:, x])  # row 0 covers columns 0 and 1
    # The empty row stays white and a darker share is a darker blue.
    assert sum(_shade(0.9)) < sum(_shade(0.5)) < sum(_shade(0.1)) < sum(_shade(0.0)) == 3 * 255
    assert len(_pixels_of(confusion_matrix_figure(np.zeros((3, 3), np.int64)), _shade(0.5))) == 0
    big = confusion_matrix_figure(np.eye(150, dtype=np.int64))
    assert max(big.shape[:2]) <= 1100
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_figure(mat, ["a", "b"])
