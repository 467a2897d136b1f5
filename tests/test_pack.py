"""seg_dist.pack (library and command), seg_dist.shards: real files, read back with stock webdataset and tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import png_bytes
from PIL import Image

from seg_dist import atomic, cli, shards
from seg_dist.pack import PackError, PackOptions, pack, pack_synthetic
from seg_dist.pack.__main__ import main as pack_main
from seg_dist.visualize import palette


def _save_image(path: Path, hw: tuple[int, int] = (6, 8), seed: int = 0, mode: str = "RGB") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (*hw, 3) if mode == "RGB" else hw
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path.read_bytes()


def _labels(hw: tuple[int, int] = (6, 8), seed: int = 0, num_classes: int = 3) -> np.ndarray:
    labels = np.random.default_rng(seed + 100).integers(0, num_classes, hw).astype(np.uint8)
    labels[0, 0] = 255  # one ignored pixel per mask
    return labels


def _save_mask(path: Path, labels: np.ndarray, palette_png: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels)
    if palette_png:
        im.putpalette(palette(256).tobytes())
    im.save(path)


def _dataset(root: Path, stems: list[str], ext: str = "png") -> dict[str, tuple[bytes, np.ndarray]]:
    """root/images/<stem>.<ext> + root/masks/<stem>.png; returns stem -> (image bytes, labels)."""
    data = {}
    for i, stem in enumerate(stems):
        img = _save_image(root / "images" / f"{stem}.{ext}", seed=i)
        labels = _labels(seed=i)
        _save_mask(root / "masks" / f"{stem}.png", labels, palette_png=i % 2 == 1)
        data[stem] = (img, labels)
    return data


def _run(root: Path, *extra: str, out: str = "out") -> int:
    argv = ["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / out)]
    return pack_main([*argv, "--num-classes", "3", "--workers", "1", *extra])


def _samples(out: Path, split: str) -> list[dict]:
    manifest = shards.load_manifest(out)
    return list(wds.WebDataset(shards.shard_urls(out, manifest, split), shardshuffle=False, empty_check=False))


def test_round_trip(tmp_path: Path) -> None:
    data = _dataset(tmp_path, ["a", "b", "c", "d", "e"], ext="jpg")
    # Two workers: exercises the process pool once.
    assert _run(tmp_path, "--samples-per-shard", "2", "--workers", "2") == 0
    out = tmp_path / "out"
    manifest = shards.load_manifest(out)
    split = manifest["splits"]["train"]
    assert manifest["format"] == shards.FORMAT and manifest["num_classes"] == 3
    assert manifest["class_names"] == ["class_0", "class_1", "class_2"] and manifest["ignore_index"] == 255
    assert split["num_samples"] == 5 and shards.split_count(manifest, "train") == 5
    assert shards.shard_counts(manifest, "train") == [2, 2, 1]
    assert [s["name"] for s in split["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert split["rejects"] == [] and manifest["max_size"] is None
    assert split["image_size"] == {"min_hw": [6, 8], "max_hw": [6, 8], "mean_hw": [6, 8], "original_mean_hw": [6, 8]}
    hist = sum(np.bincount(lab[lab != 255], minlength=3) for _, lab in data.values())
    assert split["class_histogram"] == hist.tolist() and split["ignored_pixels"] == 5

    samples = _samples(out, "train")
    assert [s["__key__"] for s in samples] == ["a", "b", "c", "d", "e"]
    for s in samples:
        img, labels = data[s["__key__"]]
        assert s["jpg"] == img  # original bytes, not re-encoded
        assert np.array_equal(shards.decode_mask(s["mask.png"]), labels)
        assert Image.open(io.BytesIO(s["mask.png"])).mode == "L"
        meta = json.loads(s["json"])
        assert meta == {"source": f"{s['__key__']}.jpg", "mask_source": f"{s['__key__']}.png", "size_hw": [6, 8],
                        "image": {"channels": 3, "dtype": "uint8"}}
        assert shards.decode_image(s["jpg"]).shape == (6, 8, 3)

    for entry, url in zip(split["shards"], shards.shard_urls(out, manifest, "train"), strict=True):
        raw = Path(url).read_bytes()
        assert Path(url).is_absolute() and entry["bytes"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        with tarfile.open(url) as tar:
            members = tar.getmembers()
            assert len(members) == 3 * entry["num_samples"]
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    assert not list(out.glob(".*"))  # no temporary files left


def test_nested_mixed_extensions_and_key_sanitising(tmp_path: Path) -> None:
    img_bytes = {
        "sub/img.001": _save_image(tmp_path / "images/sub/img.001.JPG", seed=1),
        "a b": _save_image(tmp_path / "images/a b.png", seed=2, mode="L"),
        "x": _save_image(tmp_path / "images/x.tiff", seed=3),
    }
    _save_mask(tmp_path / "masks/sub/img.001.png", _labels(seed=1))
    _save_mask(tmp_path / "masks/a b.bmp", _labels(seed=2))
    _save_mask(tmp_path / "masks/x.tif", _labels(seed=3))
    (tmp_path / "images/.hidden.jpg").write_bytes(b"editor debris is skipped")
    assert _run(tmp_path) == 0
    samples = {s["__key__"]: s for s in _samples(tmp_path / "out", "train")}
    assert sorted(samples) == ["a_b", "sub__img_001", "x"]
    assert samples["sub__img_001"]["jpg"] == img_bytes["sub/img.001"]
    assert samples["a_b"]["png"] == img_bytes["a b"]
    assert samples["x"]["tif"] == img_bytes["x"]
    assert shards.decode_image(samples["a_b"]["png"]).shape == (6, 8, 1)  # grey kept as is, the loader expands it
    assert np.array_equal(shards.decode_mask(samples["a_b"]["mask.png"]), _labels(seed=2))
    assert json.loads(samples["sub__img_001"]["json"])["source"] == "sub/img.001.JPG"


def _break_undecodable(root: Path) -> str:
    (root / "images/b.png").write_bytes(b"not an image at all")
    return "images/b.png: not an image seg_dist can read (JPEG, PNG, TIFF or BMP), or damaged"


def _break_size(root: Path) -> str:
    _save_mask(root / "masks/b.png", _labels(hw=(7, 8)))
    return "masks/b.png: mask size 7x8 != image size 6x8"


def _break_rgb_mask(root: Path) -> str:
    Image.new("RGB", (8, 6), (1, 2, 3)).save(root / "masks/b.png")
    return "masks/b.png: mask has 3 channels"


def _break_range(root: Path) -> str:
    labels = _labels()
    labels[1, 1] = 7
    _save_mask(root / "masks/b.png", labels)
    return "masks/b.png: label values 7 outside [0, 3)"


def _break_duplicate(root: Path) -> str:
    _save_image(root / "images/b.jpg")
    return "images/b.jpg: duplicate image stem 'b'"


def _break_unpaired_image(root: Path) -> str:
    _save_image(root / "images/z.png")
    return "images/z.png: no mask with stem 'z'"


def _break_unpaired_mask(root: Path) -> str:
    _save_mask(root / "masks/y.png", _labels())
    return "masks/y.png: no image with stem 'y'"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_undecodable,
        _break_size,
        _break_rgb_mask,
        _break_range,
        _break_duplicate,
        _break_unpaired_image,
        _break_unpaired_mask,
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str], breaker) -> None:
    _dataset(tmp_path, ["a", "b", "c"])
    expected = breaker(tmp_path)
    assert _run(tmp_path) == 2
    assert expected in capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert not (tmp_path / "out").exists()


def test_all_problems_listed_and_skip_bad_records_rejects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _dataset(tmp_path, ["a", "b", "c", "d"])
    _break_undecodable(tmp_path)
    _break_unpaired_mask(tmp_path)
    labels = _labels()
    labels[2, 2] = 9
    _save_mask(tmp_path / "masks/c.png", labels)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "images/b.png" in err and "masks/y.png" in err and "masks/c.png" in err and "3 problem(s)" in err
    assert not (tmp_path / "out").exists()

    assert _run(tmp_path, "--skip-bad") == 0
    split = shards.load_manifest(tmp_path / "out")["splits"]["train"]
    assert split["num_samples"] == 2
    assert [s["__key__"] for s in _samples(tmp_path / "out", "train")] == ["a", "d"]
    rejected = {Path(r["path"]).name: r["error"] for r in split["rejects"]}
    assert sorted(rejected) == ["b.png", "c.png", "y.png"]
    assert "label values 9" in rejected["c.png"]


def test_palette_png_mask_indices_are_classes(tmp_path: Path) -> None:
    labels = _labels()
    _save_image(tmp_path / "images/a.png")
    _save_mask(tmp_path / "masks/a.png", labels, palette_png=True)
    assert Image.open(tmp_path / "masks/a.png").mode == "P"
    assert _run(tmp_path) == 0
    (sample,) = _samples(tmp_path / "out", "train")
    assert np.array_equal(shards.decode_mask(sample["mask.png"]), labels)


def test_label_map(tmp_path: Path) -> None:
    _save_image(tmp_path / "images/a.png")
    source = np.array([[7, 8, 26, 0], [7, 7, 3, 300]] * 3, np.uint16)  # 16-bit source ids
    (tmp_path / "masks").mkdir()
    Image.fromarray(source).save(tmp_path / "masks/a.png")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("7: 0\n8: 1\n26: 2\n0: 255\n")
    assert _run(tmp_path, "--label-map", str(mapping)) == 2  # image is 6x8, mask 6x4
    _save_image(tmp_path / "images/a.png", hw=(6, 4))
    assert _run(tmp_path, "--label-map", str(mapping)) == 0
    (sample,) = _samples(tmp_path / "out", "train")
    expected = np.array([[0, 1, 2, 255], [0, 0, 255, 255]] * 3)
    assert np.array_equal(shards.decode_mask(sample["mask.png"]), expected)
    split = shards.load_manifest(tmp_path / "out")["splits"]["train"]
    assert split["class_histogram"] == [9, 3, 3] and split["ignored_pixels"] == 9


def test_rgb_palette(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_image(tmp_path / "images/a.png", hw=(2, 3))
    rgb = np.array([[[128, 0, 0], [0, 128, 0], [0, 0, 0]], [[9, 9, 9], [128, 0, 0], [0, 0, 255]]], np.uint8)
    (tmp_path / "masks").mkdir()
    Image.fromarray(rgb).save(tmp_path / "masks/a.png")
    pal = tmp_path / "palette.yaml"
    pal.write_text('"128,0,0": 1\n"#008000": 2\n0: [0, 0, 0]\n255: [[0, 0, 255]]\n')
    assert _run(tmp_path, "--palette", str(pal)) == 0
    (sample,) = _samples(tmp_path / "out", "train")
    assert np.array_equal(shards.decode_mask(sample["mask.png"]), [[1, 2, 0], [255, 1, 255]])
    # The manifest keeps the dataset's colours for the pictures (class 0, 1, 2 as the file gives them).
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["palette"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    pal.write_text('"128,0,0": 5\n')
    assert _run(tmp_path, "--palette", str(pal), out="out2") == 2
    assert "class 5 is not in [0, 3)" in capsys.readouterr().err


def test_list_and_suffix_stripping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, stem in enumerate(["city/a", "city/b", "city/c"]):
        _save_image(tmp_path / f"images/{stem}_leftImg8bit.png", seed=i)
        _save_mask(tmp_path / f"masks/{stem}_gtFine_labelIds.png", _labels(seed=i))
        Image.new("RGB", (8, 6)).save(tmp_path / f"masks/{stem}_gtFine_color.png")  # not a label mask
    listing = tmp_path / "train.txt"
    listing.write_text("city/a\n\ncity/c\n")
    suffixes = ["--image-suffix", "_leftImg8bit", "--mask-suffix", "_gtFine_labelIds"]
    assert _run(tmp_path, *suffixes, "--list", str(listing)) == 0
    samples = _samples(tmp_path / "out", "train")
    assert [s["__key__"] for s in samples] == ["city__a", "city__c"]
    assert json.loads(samples[0]["json"])["mask_source"] == "city/a_gtFine_labelIds.png"

    listing.write_text("city/a\ncity/zzz\n")
    assert _run(tmp_path, *suffixes, "--list", str(listing), out="out2") == 2
    assert f"--list {listing}: listed stem 'city/zzz' has no image" in capsys.readouterr().err


def test_val_fraction_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    stems = [f"s{i:02d}" for i in range(10)]
    _dataset(tmp_path, stems)
    assert _run(tmp_path, "--val-fraction", "0.3", out="o1") == 0
    assert _run(tmp_path, "--val-fraction", "0.3", out="o2") == 0
    assert _run(tmp_path, "--val-fraction", "0.3", "--seed", "1", out="o3") == 0
    keys = {
        o: {sp: [s["__key__"] for s in _samples(tmp_path / o, sp)] for sp in ("train", "val")}
        for o in ("o1", "o2", "o3")
    }
    assert keys["o1"] == keys["o2"] and keys["o1"] != keys["o3"]
    train, val = set(keys["o1"]["train"]), set(keys["o1"]["val"])
    assert len(val) == 3 and not train & val and train | val == set(stems)


def test_second_split_appended_and_repack_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _dataset(tmp_path, ["a", "b", "c", "d"])
    out = tmp_path / "out"
    assert _run(tmp_path, "--samples-per-shard", "1", "--class-names", "x,y,z") == 0
    assert _run(tmp_path, "--split", "test") == 0
    manifest = shards.load_manifest(out)
    assert list(manifest["splits"]) == ["train", "test"] and manifest["class_names"] == ["x", "y", "z"]
    assert shards.split_count(manifest, "test") == 4

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _run(tmp_path) == 2
    assert "split 'train' is in the manifest; pass --overwrite" in capsys.readouterr().err
    args = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--out", str(out)]
    assert pack_main([*args, "--num-classes", "4", "--split", "val", "--workers", "1"]) == 2
    assert "num_classes is 3" in capsys.readouterr().err
    # Whether the labels depend on which way up an image is holds for the whole set.
    assert not shards.rotation_invariant(manifest)
    assert pack_main([*args, "--num-classes", "3", "--split", "val", "--workers", "1", "--rotation-invariant"]) == 2
    assert "rotation_invariant is False for splits ['train', 'test'], this pack has True" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _run(tmp_path, "--rotation-invariant", out="free") == 0
    assert shards.rotation_invariant(shards.load_manifest(tmp_path / "free"))

    assert _run(tmp_path, "--overwrite", "--samples-per-shard", "3") == 0
    manifest = shards.load_manifest(out)
    assert shards.shard_counts(manifest, "train") == [3, 1] and manifest["class_names"] == ["x", "y", "z"]
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    unknown = r"split 'val' not in .*manifest.json; available splits: test, train"
    with pytest.raises(shards.ManifestError, match=unknown):
        shards.shard_urls(out, manifest, "val")

    (tmp_path / "stray").mkdir()
    (tmp_path / "stray/train-000000.tar").write_bytes(b"someone's file")
    assert _run(tmp_path, out="stray") == 2
    assert "split 'train' has 1 shard files; pass --overwrite" in capsys.readouterr().err


def test_deterministic_bytes(tmp_path: Path) -> None:
    _dataset(tmp_path, ["a", "b", "c"], ext="jpg")
    assert _run(tmp_path, "--val-fraction", "0.34", out="o1") == 0
    assert _run(tmp_path, "--val-fraction", "0.34", out="o2") == 0
    files = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert files == ["manifest.json", "train-000000.tar", "train.index.npy", "val-000000.tar", "val.index.npy"]
    for name in files:
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    if shutil.which("tar"):  # stock tar reads the shards too
        listing = subprocess.run(
            ["tar", "tf", str(tmp_path / "o1" / files[1])], capture_output=True, text=True, check=False
        )
        first = shards.load_manifest(tmp_path / "o1")["splits"]["train"]["num_samples"]
        assert listing.returncode == 0 and len(listing.stdout.split()) == 3 * first


def test_max_size_resizes_image_and_mask(tmp_path: Path) -> None:
    _save_image(tmp_path / "images/a.jpg", hw=(20, 40))
    labels = np.zeros((20, 40), np.uint8)
    labels[:, 20:] = 2
    _save_mask(tmp_path / "masks/a.png", labels)
    assert _run(tmp_path, "--max-size", "10") == 0
    (sample,) = _samples(tmp_path / "out", "train")
    assert shards.decode_image(sample["jpg"]).shape == (5, 10, 3)
    assert np.array_equal(shards.decode_mask(sample["mask.png"]), np.repeat([[0] * 5 + [2] * 5], 5, 0))
    manifest = shards.load_manifest(tmp_path / "out")
    split = manifest["splits"]["train"]
    assert json.loads(sample["json"])["size_hw"] == [20, 40] and split["image_size"]["max_hw"] == [5, 10]
    assert manifest["max_size"] == 10 and split["image_size"]["original_mean_hw"] == [20, 40]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m["splits"]["train"]["shards"][0].update(name="../other/train-000000.tar"),
         "shard name '../other/train-000000.tar' leads outside the shard folder"),
        (lambda m: m["splits"]["train"]["shards"][0].update(name="sub/../../x.tar"),
         "shard name 'sub/../../x.tar' leads outside the shard folder"),
        (lambda m: m["splits"]["train"]["shards"][0].update(name="/tmp/train-000000.tar"),
         "shard name '/tmp/train-000000.tar' is an absolute path"),
        (lambda m: m["splits"]["train"]["shards"][0].update(name="C:\\data\\x.tar"),
         "is an absolute path or uses"),
        (lambda m: m["splits"]["train"]["shards"].__setitem__(1, dict(m["splits"]["train"]["shards"][0])),
         "shard 'train-000000.tar' is listed twice in split 'train'"),
        (lambda m: m["splits"]["val"]["shards"].__setitem__(0, dict(m["splits"]["train"]["shards"][1])),
         "shard 'train-000001.tar' is listed in splits 'train' and 'val'"),
        (lambda m: m.update(rotation_invariant="yes"), "rotation_invariant='yes': expected true or false"),
    ],
)
def test_manifest_shards_stay_in_their_folder_once(tmp_path: Path, edit, problem: str) -> None:
    # A manifest from elsewhere must not make training read files outside the folder, nor one shard twice
    # (and another never).
    _dataset(tmp_path, ["a", "b", "c", "d", "e", "f"])
    assert _run(tmp_path, "--samples-per-shard", "2", "--val-fraction", "0.34") == 0
    path = tmp_path / "out" / shards.MANIFEST
    manifest = json.loads(path.read_text())
    shards.load_manifest(tmp_path / "out")  # sound as packed
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(shards.ManifestError) as caught:
        shards.load_manifest(tmp_path / "out")
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)


def test_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert pack_main(["--synthetic", "--n", "20", "--size", "32", "--out", str(out), "--workers", "1"]) == 0
    manifest = shards.load_manifest(out)
    assert manifest["class_names"][:2] == ["background", "disc"] and manifest["num_classes"] == 6
    assert shards.split_count(manifest, "train") == 16 and shards.split_count(manifest, "val") == 4


def test_cli_subprocess(tmp_path: Path) -> None:
    _dataset(tmp_path, ["a", "b"])
    cmd = [sys.executable, "-m", "seg_dist.pack", "--images", str(tmp_path / "images")]
    cmd += ["--masks", str(tmp_path / "masks"), "--num-classes", "3", "--workers", "1"]
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "train: 2 samples in 1 shard(s)" in ok.stdout
    _break_range(tmp_path)
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "bad")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "masks/b.png: label values 7" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_library_without_argparse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path, ["a", "b", "c"])
    options = PackOptions(
        images=str(tmp_path / "images"),  # str or Path
        masks=tmp_path / "masks",
        out=tmp_path / "out",
        num_classes=3,
        class_names=["x", "y", "z"],
        samples_per_shard=2,
        workers=1,
    )
    assert options.out == tmp_path / "out" and options.class_names == ("x", "y", "z")
    with pytest.raises(AttributeError):
        options.split = "val"  # type: ignore[misc]  # frozen
    result = pack(options)
    assert result.out == tmp_path / "out" and result.splits == ("train",) and result.rejects == []
    assert result.manifest == shards.load_manifest(tmp_path / "out")
    assert result.manifest["class_names"] == ["x", "y", "z"] and shards.shard_counts(result.manifest, "train") == [2, 1]
    assert [s["__key__"] for s in _samples(tmp_path / "out", "train")] == sorted(data)
    assert capsys.readouterr().out == ""  # the library reports through its result, the command prints

    # Problems come back on the exception, which the command wrapper knows as a user error.
    _break_range(tmp_path)
    with pytest.raises(PackError, match=r"1 problem\(s\); nothing written") as info:
        pack(PackOptions(tmp_path / "images", tmp_path / "masks", tmp_path / "out2", 3, workers=1))
    assert isinstance(info.value, cli.UserError)
    ((path, problem),) = info.value.problems
    assert path.endswith("masks/b.png") and problem.startswith("label values 7")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(PackError, match="--split must be one of train, val, test"):
        pack(PackOptions(tmp_path / "images", tmp_path / "masks", tmp_path / "out2", 3, split="dev"))
    with pytest.raises(PackError, match="need n >= 1"):
        pack_synthetic(tmp_path / "synth", n=0, workers=1)


def test_shard_names(tmp_path: Path) -> None:
    assert shards.shard_name("train", 12) == "train-000012.tar"
    pattern = shards.shard_name_pattern("train")
    assert pattern.fullmatch(shards.shard_name("train", 3)) and not pattern.fullmatch("train-3.tar")
    assert not shards.shard_name_pattern("v.l").fullmatch("val-000000.tar")  # the split name is literal
    assert shards.existing_shards(tmp_path / "missing", "train") == []
    for name in ("train-000001.tar", "train-000000.tar", "val-000000.tar", ".train-000002.tar.1.tmp", "train.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shards.existing_shards(tmp_path, "train")] == ["train-000000.tar", "train-000001.tar"]


@pytest.mark.parametrize("command", [["seg_dist.pack"], ["seg_dist", "pack"]])
def test_help_subprocess(command: list[str]) -> None:
    # `python -m seg_dist pack` is what the `seg-dist pack` console script runs.
    done = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "--synthetic" in done.stdout and "--num-classes" in done.stdout
    assert done.stderr == ""  # e.g. no runpy warning about seg_dist.pack.__main__ being imported twice


def test_manifest_helpers(tmp_path: Path) -> None:
    with pytest.raises(shards.ManifestError, match=r"manifest\.json: no shard manifest"):
        shards.load_manifest(tmp_path)
    atomic.write_text(tmp_path / shards.MANIFEST, "{not json")
    with pytest.raises(shards.ManifestError, match=r"manifest\.json: unreadable"):
        shards.load_manifest(tmp_path)
    atomic.write_text(tmp_path / shards.MANIFEST, json.dumps({"format": shards.FORMAT}))
    with pytest.raises(shards.ManifestError, match="lacks keys"):
        shards.load_manifest(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [shards.MANIFEST]
    a = {"x": 1, "y": [1, 2]}
    assert shards.manifest_digest(a) == shards.manifest_digest({"y": [1, 2], "x": 1}) != shards.manifest_digest({})

    buf = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="3 channels"):
        shards.decode_mask(buf.getvalue())
    mask = shards.decode_mask(png_bytes(np.array([[1, 300]], np.uint16)))
    assert mask.dtype == np.int64 and mask.flags.writeable and mask.tolist() == [[1, 300]]
    image = shards.decode_image(png_bytes(np.zeros((2, 3), np.uint8)))
    assert image.shape == (2, 3, 1) and image.dtype == np.uint8 and image.flags.writeable

    colours = palette(40)
    assert colours.shape == (40, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 40 and np.array_equal(colours[:6], palette(6))
