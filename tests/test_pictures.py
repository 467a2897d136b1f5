"""What a run shows: class colours, titled and legended pictures, their size, overlays from the whole split,
and a validation progress bar over the whole split."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from seg_dist import distributed
from seg_dist.config import DataConfig
from seg_dist.runlog import RunLog, progress
from seg_dist.validation import validate
from seg_dist.visualize import (
    IGNORE_COLOUR,
    delta_e,
    ignore_colour,
    overlay,
    overlay_with_legend,
    palette,
    palette_for,
    preview_grid,
    save_mask_png,
    srgb_to_lab,
    validation_pictures,
)

NAMES = ["sky", "road", "car", "tree", "person", "building"]
# A uniform image, so the image panel is exactly this colour and overlays are exact blends; not grey, as
# anti-aliased black text on white is.
IMAGE = (90, 160, 210)


def _min_difference(colours: np.ndarray) -> float:
    lab = srgb_to_lab(colours)
    d = delta_e(lab[:, None], lab[None]) + np.eye(len(colours)) * 1e9
    return float(d.min())


def test_delta_e_is_ciede2000():
    # Sharma, Wu and Dalal's reference pairs for CIEDE2000.
    assert delta_e(np.array([50, 2.6772, -79.7751]), np.array([50, 0, -82.7485])) == pytest.approx(2.0425, abs=1e-4)
    assert delta_e(np.array([50, 2.5, 0]), np.array([73, 25, -18])) == pytest.approx(27.1492, abs=1e-4)
    assert delta_e(np.array([50, 2.5, 0]), np.array([50, 3.1736, 0.5854])) == pytest.approx(1.0, abs=1e-4)


def test_palette_colours_stay_apart_for_2_to_40_classes():
    """CIEDE2000 of about 2 is just noticeable side by side. The pairs the tester could not tell apart in the
    old 11-class palette (yellow / lime, magenta / purple) were 14.1 and 21.1 apart, so up to 12 classes every
    pair must differ by more than 25. Beyond, sRGB runs out of room once black, grey and white are reserved:
    the greedy farthest-point walk (within a factor 2 of the best possible) keeps 19 up to 20 classes and 13
    up to 40, where the old palette had pairs under 3 apart."""
    for n in range(2, 41):
        p = palette(n)
        assert np.array_equal(p, palette(40)[:n])  # a class keeps its colour whatever the class count
        floor = 25 if n <= 12 else 19 if n <= 20 else 13
        assert _min_difference(p) > floor, n
    reserved = srgb_to_lab(np.array([IGNORE_COLOUR, (128, 128, 128), (255, 255, 255)]))
    lab = srgb_to_lab(palette(40))
    # No class is black (the ignore colour), grey or white, nor close to them.
    assert delta_e(lab[:, None], reserved[None]).min() > 15
    assert ignore_colour(palette(40)) == IGNORE_COLOUR
    assert not any(tuple(c) == IGNORE_COLOUR for c in palette(300))
    assert len({tuple(c) for c in palette(300)}) == 300


def test_the_dataset_palette_wins(caplog):
    voc = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC's first colours: class 0 is black there
    p = palette_for({"palette": voc}, 6)
    assert p[:3].tolist() == voc
    # Classes the manifest does not colour get generated colours unlike the given ones.
    lab = srgb_to_lab(p)
    assert delta_e(lab[3:, None], lab[None, :3]).min() >= 10 and _min_difference(p) > 10
    # A class is black, so ignored pixels take another reserved colour.
    mask = np.array([[0, 255]])
    painted = overlay(np.zeros((1, 2, 3), np.uint8), mask, 6, alpha=1.0, colours=p)
    assert tuple(painted[0, 0]) == (0, 0, 0) and tuple(painted[0, 1]) == ignore_colour(p) != (0, 0, 0)
    assert np.array_equal(palette_for({}, 6), palette(6)) and np.array_equal(palette_for(None, 6), palette(6))
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(palette_for({"palette": [[1, 2], [3, 4], [5, 6]]}, 6), palette(6))
    assert "manifest palette ignored" in caplog.text


def _example(h: int, w: int, ignore: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.tensor(IMAGE, dtype=torch.uint8).expand(h, w, 3).clone()
    target = torch.full((h, w), 1, dtype=torch.int64)
    target[:, w // 2 :] = 3
    if ignore:
        target[: max(1, h // 16)] = 255
    pred = torch.full((h, w), 1, dtype=torch.int64)
    pred[h // 2 :, : w // 2] = 4
    return image, target, pred


def _box(picture: np.ndarray, colour: tuple[int, ...]) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((picture == np.array(colour, np.uint8)).all(axis=2))
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _has_square(flags: np.ndarray, side: int) -> bool:
    """Whether a side x side block of True lies in `flags` (a filled swatch, not a text stroke)."""
    c = np.pad(flags.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
    return bool((sums == side * side).any())


def _legend_swatch_side(picture: np.ndarray, colour: np.ndarray, below: int) -> int:
    y0, y1, _, _ = _box(picture[below:], tuple(colour))
    return y1 - y0 + 1


def test_validation_picture_has_titled_panels_and_a_legend_of_the_classes_shown():
    colours = palette(len(NAMES))
    (picture,) = validation_pictures([_example(48, 64)], (0.5,) * 3, (0.2,) * 3, len(NAMES), 255, NAMES,
                                     keys=["val/img_0001"])
    y0, y1, x0, x1 = _box(picture, IMAGE)  # the image panel
    w, pad = x1 - x0 + 1, x0
    assert w >= 160 and y0 > 20  # small images are enlarged; there is room above the panels
    title_band = picture[y0 - (y0 - pad) // 2 : y0]
    for k in range(3):  # a dark title over each of image | ground truth | prediction
        xs = slice(pad + k * (w + pad), pad + k * (w + pad) + w)
        assert (title_band[:, xs].max(axis=2) < 80).sum() > 20, k
    # The three panels: the image, then the truth and the prediction blended over it.
    gt_left = overlay(np.full((1, 1, 3), IMAGE, np.uint8), np.array([[1]]), len(NAMES), colours=colours)[0, 0]
    assert np.array_equal(picture[y1, pad + (w + pad) + 1], gt_left)
    legend = picture[y1 + 1 :]
    for c in (1, 3, 4):  # in the truth or the prediction: a filled swatch in the legend
        assert _has_square((legend == colours[c]).all(axis=2), 8), NAMES[c]
    for c in (0, 2, 5):
        assert not (legend == colours[c]).all(axis=2).any(), NAMES[c]
    assert _has_square((legend == IGNORE_COLOUR).all(axis=2), 8)  # "ignored" has its swatch
    (no_ignore,) = validation_pictures([_example(48, 64, ignore=False)], (0.5,) * 3, (0.2,) * 3, len(NAMES), 255,
                                       NAMES)
    assert not _has_square((no_ignore[_box(no_ignore, IMAGE)[1] + 1 :] == IGNORE_COLOUR).all(axis=2), 8)


def test_text_and_legend_scale_with_the_picture_and_big_pictures_are_reduced():
    colours = palette(len(NAMES))
    small, big = validation_pictures([_example(48, 64), _example(3000, 4000)], (0.5,) * 3, (0.2,) * 3,
                                     len(NAMES), 255, NAMES)
    assert max(big.shape[:2]) <= 2048 and big.shape[1] > 1900
    side_small = _legend_swatch_side(small, colours[3], _box(small, IMAGE)[1] + 1)
    side_big = _legend_swatch_side(big, colours[3], _box(big, IMAGE)[1] + 1)
    assert side_small >= 12 and side_big >= 2 * side_small
    (capped,) = validation_pictures([_example(3000, 4000)], (0.5,) * 3, (0.2,) * 3, len(NAMES), 255, NAMES,
                                    max_side=900)
    assert max(capped.shape[:2]) <= 900


def test_predict_overlay_of_a_large_image_is_reduced_but_the_mask_file_is_not(tmp_path):
    names = [f"class_{i}" for i in range(11)]
    colours = palette(11)
    image = np.full((3000, 4000, 3), IMAGE, np.uint8)
    mask = np.full((3000, 4000), 2, np.int64)
    mask[:, :1000] = 0
    mask[1500:, 1000:] = 7
    picture = overlay_with_legend(image, mask, names)
    assert max(picture.shape[:2]) <= 2048 and picture.shape[1] > 1900  # was 12008 x 3026
    bottom = _box(picture, IMAGE)[1]
    panels = picture[: bottom + 1]
    # The prediction panel is reduced label by label (nearest): its region of class 2 is that colour only.
    y0, y1, x0, x1 = _box(panels, tuple(colours[2]))
    assert (panels[y0 : y1 + 1, x0 : x1 + 1] == colours[2]).all()
    assert (y1 - y0 + 1) * 2 == pytest.approx(bottom - _box(panels, IMAGE)[0] + 1, abs=2)
    assert _legend_swatch_side(picture, colours[7], bottom + 1) >= 30  # the legend grew with the picture
    assert max(overlay_with_legend(image, mask, names, max_side=1000).shape[:2]) <= 1000
    save_mask_png(tmp_path / "m.png", mask, 11)
    with Image.open(tmp_path / "m.png") as f:
        assert np.array_equal(np.array(f), mask)


def test_preview_grid_titles_every_tile_and_has_one_legend():
    colours = palette(len(NAMES))
    samples = [(np.full((32, 32, 3), IMAGE, np.uint8), np.full((32, 32), c, np.int64)) for c in (0, 2, 2)]
    picture = preview_grid(samples, NAMES, cols=2)
    y0, _, x0, x1 = _box(picture, IMAGE)  # the first image tile
    assert y0 > 10 and (picture[:y0, x0 : x1 + 1].max(axis=2) < 80).sum() > 10  # its title
    below = picture[_box(picture, IMAGE)[1] + 1 :]
    legend = below[below.shape[0] - 3 * max(12, (x1 - x0) // 4) :]
    assert _has_square((legend == colours[0]).all(axis=2), 8) and _has_square((legend == colours[2]).all(axis=2), 8)
    assert not (legend == colours[1]).all(axis=2).any()
    assert max(preview_grid(samples * 20, NAMES, cols=8, max_side=700).shape[:2]) <= 700


def _batches(indices: list[int], keys: list[str], batch: int):
    for i in range(0, len(indices), batch):
        idx = indices[i : i + batch]
        images = torch.stack([torch.full((6, 8, 3), j, dtype=torch.uint8) for j in idx])
        masks = torch.stack([torch.full((6, 8), j % 3, dtype=torch.int64) for j in idx])
        yield images, masks, [keys[j] for j in idx], [(6, 8)] * len(idx)


_DATA = DataConfig(mean=[0.5] * 3, std=[0.2] * 3)  # validate normalises by the run's resolved constants


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 3, 1)


def test_validate_keeps_the_first_samples_by_key_whatever_the_loader_order():
    keys = [f"k{i}" for i in range(7)]
    order = [4, 5, 0, 1, 6, 2, 3]  # loader workers interleave their batches
    result = validate(_model(), _batches(order, keys, 2), 3, 255, torch.device("cpu"), _DATA, keep=3)
    assert result.example_keys == ["k0", "k1", "k2"]
    assert [int(image[0, 0, 0]) for image, _, _ in result.examples] == [0, 1, 2]
    image, target, pred = result.examples[0]
    assert image.dtype == torch.uint8 and image.shape == (6, 8, 3) and target.shape == pred.shape == (6, 8)
    assert len(validation_pictures(result.examples, (0.5,) * 3, (0.2,) * 3, 3, 255)) == 3


def _validate_on_rank(denv, device, out: str) -> None:
    keys = [f"k{i}" for i in range(7)]
    lo, hi = denv.rank * 7 // denv.world_size, (denv.rank + 1) * 7 // denv.world_size  # as data.val_share
    found = {}
    for name, keep in (("everywhere", 4), ("rank0", 4 if denv.is_main else 0)):
        result = validate(_model(), _batches(list(range(lo, hi)), keys, 2), 3, 255, device, _DATA, keep=keep)
        found[name] = {"keys": result.example_keys, "values": [int(image[0, 0, 0]) for image, _, _ in result.examples],
                       "samples": result.samples_seen}
    Path(f"{out}.{denv.rank}").write_text(json.dumps(found))


def test_validation_overlays_come_from_the_whole_split_on_two_ranks(tmp_path):
    out = str(tmp_path / "rank")
    distributed.spawn_local_group(2, _validate_on_rank, (out,), device="cpu")
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert all(r[name]["samples"] == 7 for r in results for name in ("everywhere", "rank0"))
    # Rank 0 validates k0..k2 and rank 1 k3..k6: the 4 overlays are the split's first 4, on every rank.
    assert all(r["everywhere"] == {"keys": ["k0", "k1", "k2", "k3"], "values": [0, 1, 2, 3], "samples": 7}
               for r in results)
    # `keep` on rank 0 only (the trainer's old call) does not hang the gathering; rank 0's own share then.
    assert results[0]["rank0"]["keys"] == ["k0", "k1", "k2"]


def test_validation_progress_counts_the_whole_split(caplog):
    with caplog.at_level(logging.INFO, logger="seg_dist.progress"), progress(101, "val", True, share=50) as bar:
        for _ in range(25):
            bar.update(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "seg_dist.progress"]
    assert lines and lines[-1].startswith("val: 100% (101/101)")
    counts = [int(line.split("(")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and len(lines) >= 5  # advances on the way, not in one jump
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seg_dist.progress"), progress(3, "val", True, share=0):
        pass  # more ranks than samples: rank 0 has none
    assert "(3/3)" in caplog.text


def test_overlays_folder_holds_only_the_last_validation(tmp_path):
    picture = np.zeros((4, 4, 3), np.uint8)
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.overlays([picture] * 4)
    log.overlays([picture] * 2)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["val_000.png", "val_001.png"]
