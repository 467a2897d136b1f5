"""lab/convert_camvid.py, convert_dubai.py and convert_drive.py on miniatures of their source layouts: the
split keeps whole drives / tiles / photos apart, classes map as documented, and bad input is one line naming
the file."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lab import convert_camvid, convert_drive, convert_dubai


def _mini_camvid(root, bad_id: int | None = None):
    # SegNet's folders as they are: 0001TP in both train and test, 0016E5 in train and val.
    layout = {
        "train": ["0001TP_006690", "0001TP_006720", "0006R0_f01800", "0016E5_00390"],
        "val": ["0016E5_07959"],
        "test": ["0001TP_008550", "Seq05VD_f00000", "Seq05VD_f00030"],
    }
    rng = np.random.default_rng(0)
    for folder, stems in layout.items():
        (root / folder).mkdir(parents=True)
        (root / f"{folder}annot").mkdir()
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(root / folder / f"{stem}.png")
            labels = rng.integers(0, 12, (6, 8), dtype=np.uint8)
            labels[0, 0] = 11  # unlabelled, at least once
            Image.fromarray(labels).save(root / f"{folder}annot" / f"{stem}.png")
    if bad_id is not None:
        Image.fromarray(np.full((6, 8), bad_id, dtype=np.uint8)).save(root / "testannot" / "Seq05VD_f00030.png")


def _lists(out):
    return {s: (out / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}


def test_camvid_split_keeps_each_drive_in_one_split(tmp_path, capsys):
    _mini_camvid(tmp_path / "CamVid")
    out = tmp_path / "camvid"
    assert convert_camvid.main(["--src", str(tmp_path / "CamVid"), "--out", str(out)]) == 0
    lists = _lists(out)
    assert lists["test"] == ["Seq05VD_f00000", "Seq05VD_f00030"]
    assert lists["val"] == ["0006R0_f01800"]
    # 0001TP's test frame joins its training frames, so no drive is on both sides.
    assert lists["train"] == ["0001TP_006690", "0001TP_006720", "0001TP_008550", "0016E5_00390", "0016E5_07959"]
    drives = {s: {convert_camvid.sequence_of(k) for k in keys} for s, keys in lists.items()}
    assert not drives["test"] & (drives["train"] | drives["val"]) and not drives["val"] & drives["train"]
    src = np.array(Image.open(tmp_path / "CamVid" / "trainannot" / "0006R0_f01800.png"))
    mask = np.array(Image.open(out / "masks" / "0006R0_f01800.png"))
    assert np.array_equal(mask[src < 11], src[src < 11]) and (mask[src == 11] == 255).all()
    frame = out / "images" / "0016E5_07959.png"
    assert frame.read_bytes() == (tmp_path / "CamVid" / "val" / "0016E5_07959.png").read_bytes()
    assert (out / "class_names.txt").read_text().strip().split(",")[::10] == ["sky", "bicyclist"]
    capsys.readouterr()
    assert convert_camvid.main(["--src", str(tmp_path / "CamVid"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_camvid_segnet_split_and_a_bad_class_id(tmp_path, capsys):
    _mini_camvid(tmp_path / "CamVid")
    out = tmp_path / "segnet"
    assert convert_camvid.main(["--src", str(tmp_path / "CamVid"), "--out", str(out), "--split", "segnet"]) == 0
    assert _lists(out)["val"] == ["0016E5_07959"] and len(_lists(out)["test"]) == 3
    _mini_camvid(tmp_path / "bad", bad_id=12)
    capsys.readouterr()
    assert convert_camvid.main(["--src", str(tmp_path / "bad"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "Seq05VD_f00030.png" in err and "class id 12" in err and len(err.strip().splitlines()) == 1


BUILDING, LAND, ROAD, VEGETATION, WATER, UNLABELED = (
    (60, 16, 152), (132, 41, 246), (110, 193, 228), (254, 221, 58), (226, 169, 41), (155, 155, 155),
)


def _mini_dubai(root, stray_colour=None):
    rng = np.random.default_rng(0)
    colours = np.array([BUILDING, LAND, ROAD, VEGETATION, WATER, UNLABELED], dtype=np.uint8)
    for t in range(1, 9):
        for part in (1, 2):
            folder = root / f"Tile {t}"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(
                folder / "images" / f"image_part_{part:03d}.jpg")
            rgb = colours[np.arange(80).reshape(8, 10) % 6]
            if stray_colour and (t, part) == (5, 2):
                rgb[3, 4] = stray_colour
            Image.fromarray(rgb).save(folder / "masks" / f"image_part_{part:03d}.png")


def test_dubai_split_by_tile_colour_table_and_scale(tmp_path, capsys):
    _mini_dubai(tmp_path / "src")
    out = tmp_path / "dubai"
    assert convert_dubai.main(["--src", str(tmp_path / "src"), "--out", str(out), "--scale", "1"]) == 0
    lists = _lists(out)
    tiles = {s: {k.split("_")[0] for k in keys} for s, keys in lists.items()}
    assert tiles == {"train": {f"tile{t}" for t in (3, 4, 5, 6, 7)}, "val": {"tile1"}, "test": {"tile2", "tile8"}}
    assert lists["val"] == ["tile1_001", "tile1_002"]  # both parts of a tile go together
    mask = np.array(Image.open(out / "masks" / "tile4_002.png"))
    assert mask.ravel()[:6].tolist() == [0, 1, 2, 3, 4, 255]  # building, land, road, vegetation, water, void
    assert (out / "images" / "tile4_002.jpg").read_bytes() == (
        tmp_path / "src" / "Tile 4" / "images" / "image_part_002.jpg").read_bytes()
    assert (out / "class_names.txt").read_text().strip() == "building,land,road,vegetation,water"

    half = tmp_path / "half"
    assert convert_dubai.main(["--src", str(tmp_path / "src"), "--out", str(half)]) == 0  # --scale 0.5
    assert Image.open(half / "images" / "tile3_001.png").size == (5, 4)
    small = np.array(Image.open(half / "masks" / "tile3_001.png"))
    assert small.shape == (4, 5) and set(np.unique(small)) <= {0, 1, 2, 3, 4, 255}


def test_dubai_unknown_colour_names_file_and_colour(tmp_path, capsys):
    _mini_dubai(tmp_path / "src", stray_colour=(1, 2, 3))
    assert convert_dubai.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Tile 5/masks/image_part_002.png" in err and "#010203" in err and len(err.strip().splitlines()) == 1


def _mini_drive(root, bad_value: int | None = None):
    rng = np.random.default_rng(0)
    inside = np.zeros((6, 7), dtype=np.uint8)
    inside[1:5, 1:6] = 255  # the field of view
    for folder, kind, numbers in (("training", "training", range(21, 26)), ("test", "test", (1, 2))):
        for sub in ("images", "1st_manual", "mask"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(
                root / folder / "images" / f"{n:02d}_{kind}.tif"
            )
            vessel = np.where(rng.random((6, 7)) < 0.3, 255, 0).astype(np.uint8)
            if bad_value is not None and n == 23:
                vessel[2, 2] = bad_value
            Image.fromarray(vessel).save(root / folder / "1st_manual" / f"{n:02d}_manual1.gif")
            Image.fromarray(inside).save(root / folder / "mask" / f"{n:02d}_{kind}_mask.gif")


def test_drive_keeps_its_test_photos_apart_and_voids_outside_the_field_of_view(tmp_path, capsys):
    _mini_drive(tmp_path / "DRIVE")
    out = tmp_path / "drive"
    assert convert_drive.main(["--src", str(tmp_path / "DRIVE"), "--out", str(out), "--val", "1"]) == 0
    assert _lists(out) == {"train": ["21", "22", "23", "24"], "val": ["25"], "test": ["01", "02"]}
    mask = np.array(Image.open(out / "masks" / "22.png"))
    vessel = np.array(Image.open(tmp_path / "DRIVE" / "training" / "1st_manual" / "22_manual1.gif").convert("L"))
    assert (mask[0] == 255).all() and (mask[:, 0] == 255).all()  # outside the field of view: ignored
    assert np.array_equal(mask[1:5, 1:6], (vessel[1:5, 1:6] == 255).astype(np.uint8))
    original = tmp_path / "DRIVE" / "test" / "images" / "01_test.tif"
    assert (out / "images" / "01.tif").read_bytes() == original.read_bytes()
    _mini_drive(tmp_path / "bad", bad_value=128)
    capsys.readouterr()
    assert convert_drive.main(["--src", str(tmp_path / "bad"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "23_manual1.gif" in err and "128" in err and len(err.strip().splitlines()) == 1
