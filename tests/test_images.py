"""Images are read as a viewer shows them (EXIF orientation applied), in pack and at read time alike, with every
band and bit (16-bit, float, N bands from PNG, TIFF and .npy); what cannot be read faithfully is refused saying
what it is; `packed_size` is the packing scale. Real JPEG/PNG/TIFF/npy bytes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from seg_dist import shards
from seg_dist.data.reader import iter_samples
from seg_dist.pack import PackError, PackOptions, pack
from seg_dist.pack.__main__ import main as pack_main

RED, BLUE = (230, 20, 20), (20, 20, 230)
# A viewer turns the stored pixels by the EXIF orientation; these store the displayed picture so that the
# turn gives it back (np.rot90 turns counter-clockwise).
STORE = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def _displayed(hw: tuple[int, int] = (32, 48)) -> tuple[np.ndarray, np.ndarray]:
    """(picture as displayed, its mask): class 1 is a red block in the top-left corner only, so any turn or
    flip of one against the other shows; blocks are 16-pixel aligned so JPEG keeps the colours clean."""
    labels = np.zeros(hw, np.uint8)
    labels[:16, :16] = 1
    rgb = np.where(labels[..., None] == 1, np.uint8(RED), np.uint8(BLUE)).astype(np.uint8)
    return rgb, labels


def _jpeg_with_orientation(path: Path, displayed: np.ndarray, orientation: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORE[orientation](displayed))).save(
        path, format="JPEG", quality=95, exif=exif.tobytes()
    )
    return path.read_bytes()


def _save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _mask(path: Path, labels: np.ndarray) -> None:
    _save(path, Image.fromarray(labels))


def _aligned(image: np.ndarray, labels: np.ndarray) -> bool:
    """Every red pixel is class 1 and every blue one class 0."""
    return image.shape[:2] == labels.shape and bool(np.array_equal(image[..., 0] > 128, labels == 1))


def _pack(root: Path, *extra: str) -> int:
    argv = ["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / "out")]
    return pack_main([*argv, "--num-classes", "2", "--workers", "1", *extra])


# --- EXIF orientation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_decode_image_shows_the_picture_as_displayed(tmp_path: Path, orientation: int) -> None:
    rgb, labels = _displayed()
    data = _jpeg_with_orientation(tmp_path / "a.jpg", rgb, orientation)
    with Image.open(io.BytesIO(data)) as raw:  # the stored pixels really are turned
        assert (raw.height, raw.width) == STORE[orientation](labels).shape
    decoded = shards.read_image(data)
    assert decoded.orientation == orientation and decoded.format == "JPEG"
    assert _aligned(decoded.pixels, labels) and _aligned(shards.decode_image(data), labels)


@pytest.mark.parametrize("orientation", [3, 6])
@pytest.mark.parametrize("max_size", [None, 24])
def test_pack_aligns_an_exif_turned_jpeg_with_its_mask(tmp_path: Path, orientation: int, max_size: int | None) -> None:
    # The mask was drawn on the picture as a viewer shows it; before the fix, orientation 3 packed with the
    # mask upside down against its image and orientation 6 was refused as a size mismatch.
    rgb, labels = _displayed()
    data = _jpeg_with_orientation(tmp_path / "images/a.jpg", rgb, orientation)
    _mask(tmp_path / "masks/a.png", labels)
    extra = ["--max-size", str(max_size)] if max_size else []
    assert _pack(tmp_path, *extra) == 0
    out = tmp_path / "out"
    manifest = shards.load_manifest(out)
    (sample,) = iter_samples(shards.shard_urls(out, manifest, "train"))
    want_hw = shards.packed_size(32, 48, max_size)
    assert sample["image"].shape[:2] == sample["mask"].shape == want_hw
    assert sample["meta"]["size_hw"] == [32, 48]  # the original as displayed
    if max_size is None:
        # The original bytes are kept, EXIF and all; the reader turns them as pack did.
        assert sample["meta"]["source"] == "a.jpg"
        assert _aligned(sample["image"], sample["mask"].astype(np.uint8)) and np.array_equal(sample["mask"], labels)
    else:
        # Resized from the upright pixels: red where the mask says 1, away from the bilinear block edge.
        red = sample["image"][..., 0] > 128
        core = (slice(0, 6), slice(0, 6))
        assert red[core].all() and (sample["mask"][core] == 1).all()
        assert not red[-4:, -4:].any() and (sample["mask"][-4:, -4:] == 0).all()
    assert manifest["splits"]["train"]["image_size"]["original_mean_hw"] == [32, 48]
    assert data  # the file itself was left alone


def test_quarter_turn_size_mismatch_names_exif(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The mask fits the stored (unturned) pixels of a 90-degree EXIF photo: the message says why.
    rgb, labels = _displayed()
    _jpeg_with_orientation(tmp_path / "images/a.jpg", rgb, 6)
    _mask(tmp_path / "masks/a.png", np.ascontiguousarray(STORE[6](labels)))
    assert _pack(tmp_path) == 2
    err = capsys.readouterr().err
    assert "masks/a.png: mask size 48x32 != image size 32x48" in err
    assert "EXIF orientation 6 (turned 90 degrees clockwise)" in err and "remove the image's EXIF orientation" in err
    assert not (tmp_path / "out").exists()


def test_mask_with_exif_orientation_is_turned_like_an_image(tmp_path: Path) -> None:
    # Both files read as a viewer shows them, so a mask carrying the photo's EXIF still lines up.
    rgb, labels = _displayed()
    _jpeg_with_orientation(tmp_path / "images/a.jpg", rgb, 3)
    exif = Image.Exif()
    exif[0x0112] = 3
    _save(tmp_path / "masks/a.png", Image.fromarray(np.ascontiguousarray(STORE[3](labels))), exif=exif.tobytes())
    assert _pack(tmp_path) == 0
    out = tmp_path / "out"
    (sample,) = iter_samples(shards.shard_urls(out, shards.load_manifest(out), "train"))
    assert np.array_equal(sample["mask"], labels) and _aligned(sample["image"], labels)


# --- image modes ---------------------------------------------------------------------------------------


def _deep(tmp: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Images that PIL's convert("RGB") would clip, and the pixels each must decode to."""
    ramp = (np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    big_endian = Image.frombytes("I;16B", (8, 6), ramp.astype(">u2").tobytes())
    floats = ramp.astype(np.float32) / 65535 - 0.25
    colour = np.dstack([ramp, 65535 - ramp, ramp // 3])
    bands = np.dstack([ramp, ramp // 2, ramp // 3, 65535 - ramp])
    thirteen = np.dstack([floats * (i + 1) for i in range(13)])
    tmp.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tmp / "rgb16.tif", colour, photometric="rgb")
    tifffile.imwrite(tmp / "bands.tif", bands, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp / "planar.tif", np.moveaxis(thirteen, 2, 0), photometric="minisblack",
                     planarconfig="separate")
    cv2.imwrite(str(tmp / "rgb16.png"), colour[..., ::-1])  # OpenCV writes BGR
    np.save(tmp / "bands.npy", bands)
    np.save(tmp / "grey.npy", floats)
    return {
        "png16": (_save(tmp / "png16.png", Image.fromarray(ramp)), ramp[..., None]),
        "tif16": (_save(tmp / "tif16.tif", Image.fromarray(ramp)), ramp[..., None]),
        "tif16b": (_save(tmp / "tif16b.tif", big_endian), ramp[..., None]),
        "float": (_save(tmp / "float.tif", Image.fromarray(floats)), floats[..., None]),
        "rgb16png": (tmp / "rgb16.png", colour),
        "rgb16tif": (tmp / "rgb16.tif", colour),
        "bands": (tmp / "bands.tif", bands),
        "planar13": (tmp / "planar.tif", thirteen),
        "npy": (tmp / "bands.npy", bands),
        "npy2d": (tmp / "grey.npy", floats[..., None]),
    }


def test_deep_and_multiband_images_decode_as_stored(tmp_path: Path) -> None:
    for name, (path, want) in _deep(tmp_path).items():
        got = shards.decode_image(path.read_bytes())
        assert got.dtype == want.dtype and np.array_equal(got, want), name
        assert got.flags.writeable and got.flags.c_contiguous, name


def test_unfaithful_images_are_refused_saying_what_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ramp = np.arange(48, dtype=np.int32).reshape(6, 8) * 100000
    nan = np.zeros((6, 8), np.float32)
    nan[2, 3] = np.nan
    refused = {
        "int32.tif": (lambda p: tifffile.imwrite(p, ramp), "TIFF of int32 pixels: seg_dist reads uint8, uint16 and "
                                                          "float32 images; convert it to uint16 or float32"),
        "f64.npy": (lambda p: np.save(p, ramp.astype(np.float64)), ".npy array of float64 pixels"),
        "nan.npy": (lambda p: np.save(p, nan), ".npy array holds NaN or infinite values"),
        "stack.tif": (lambda p: tifffile.imwrite(p, np.zeros((2, 3, 6, 8), np.uint16), photometric="minisblack"),
                      "seg_dist reads one image"),
    }
    for name, (write, what) in refused.items():
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        _mask(tmp_path / f"masks/{Path(name).stem}.png", np.zeros((6, 8), np.uint8))
        with pytest.raises(shards.ImageError, match=re.escape(what)):
            shards.decode_image(path.read_bytes())
    assert _pack(tmp_path) == 2
    err = capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    for name, (_, what) in refused.items():
        assert f"images/{name}: " in err and what in err
    assert f"{len(refused)} problem(s); nothing written" in err and not (tmp_path / "out").exists()


def test_a_sample_of_another_kind_is_refused_at_read_time(tmp_path: Path) -> None:
    # Shards packed by hand or by an older packer hold 8-bit RGB (no `image` in their JSON): a 16-bit image
    # there is refused, naming both kinds, rather than clipped.
    import tarfile

    png16 = _deep(tmp_path)["png16"][0].read_bytes()
    mask = io.BytesIO()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(mask, format="PNG")
    url = tmp_path / "train-000000.tar"
    with tarfile.open(url, "w") as tar:
        for name, data in (("a.png", png16), (f"a.{shards.MASK_FIELD}", mask.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(shards.ShardError, match=r"a 1-channel uint16 image, the dataset's images are 3-channel uint8"):
        list(iter_samples([str(url)]))


def test_eight_bit_modes(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    decoded = shards.decode_image(_save(tmp_path / "g.png", Image.fromarray(grey)).read_bytes())
    assert np.array_equal(decoded, grey[..., None])  # grey is one channel ...
    assert np.array_equal(shards.conform_image(decoded, shards.RGB8), np.repeat(grey[..., None], 3, 2))  # among RGB
    pal = Image.fromarray(grey % 4).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    decoded = shards.decode_image(_save(tmp_path / "p.png", pal).read_bytes())
    assert decoded[0, 1].tolist() == [255, 0, 0] and decoded[0, 3].tolist() == [0, 0, 255]
    # RGBA: alpha is dropped and the colour as stored is read, also under transparent pixels; kept on request.
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 200, 30), np.arange(8, dtype=np.uint8) * 30
    data = _save(tmp_path / "a.png", Image.fromarray(rgba)).read_bytes()
    assert shards.decode_image(data).shape == (6, 8, 3) and (shards.decode_image(data) == (10, 200, 30)).all()
    assert np.array_equal(shards.decode_image(data, keep_alpha=True), rgba)
    bilevel = Image.fromarray(grey > 100).convert("1")
    assert set(np.unique(shards.decode_image(_save(tmp_path / "b.tif", bilevel).read_bytes()))) == {0, 255}
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red ink
    assert (shards.decode_image(_save(tmp_path / "c.jpg", cmyk, quality=95).read_bytes())[..., 0] > 200).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_applies_to_16bit_and_tiff_images(tmp_path: Path, orientation: int) -> None:
    # The decoders beside PIL (OpenCV for 16-bit colour PNGs, tifffile) turn images as PIL turns JPEGs.
    _, labels = _displayed()
    deep = np.where(labels[..., None] == 1, np.uint16([60000, 100, 100]), np.uint16([100, 100, 60000]))
    stored = np.ascontiguousarray(STORE[orientation](deep))
    tifffile.imwrite(tmp_path / "a.tif", stored, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = io.BytesIO()
    Image.fromarray(np.zeros(stored.shape[:2], np.uint8)).save(png, format="PNG", exif=exif.tobytes())
    eight = png.getvalue()
    sixteen = cv2.imencode(".png", stored[..., ::-1])[1]
    # OpenCV writes no EXIF: splice the 8-bit PNG's eXIf chunk into the 16-bit one, before its IDAT.
    chunk = eight[eight.index(b"eXIf") - 4:]
    chunk = chunk[:chunk.index(b"IDAT") - 4]
    sixteen = sixteen.tobytes()
    at = sixteen.index(b"IDAT") - 4
    for data in ((tmp_path / "a.tif").read_bytes(), sixteen[:at] + chunk + sixteen[at:]):
        decoded = shards.read_image(data)
        assert decoded.orientation == orientation and decoded.pixels.dtype == np.uint16
        assert np.array_equal(decoded.pixels, deep)
        assert shards.exif_orientation(data) == orientation


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "empty file (0 bytes), not an image"),
    (b"GIF89a not really", "not an image seg_dist can read (JPEG, PNG, TIFF or BMP), or damaged"),
])
def test_empty_or_undecodable_image_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images/a.png").write_bytes(content)
    _mask(tmp_path / "masks/a.png", np.zeros((6, 8), np.uint8))
    assert _pack(tmp_path) == 2
    err = capsys.readouterr().err.replace(str(tmp_path) + "/", "")
    assert f"images/a.png: {problem}\n" in err and "BytesIO" not in err
    with pytest.raises(shards.ImageError, match=problem.split(" (")[0]):
        shards.decode_image(content)


def test_empty_mask_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "images/a.png", Image.new("RGB", (8, 6)))
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks/a.png").write_bytes(b"")
    assert _pack(tmp_path) == 2
    assert "masks/a.png: empty file (0 bytes), not a mask\n" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


# --- the packing scale -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("hw", "max_size", "want"), [
    ((20, 40), 10, (5, 10)),
    ((33, 50), 20, (13, 20)),  # 13.2 rounds to 13
    ((50, 33), 20, (20, 13)),
    ((1, 1000), 10, (1, 10)),  # never below one pixel
    ((20, 40), 40, (20, 40)),  # fits: unchanged
    ((20, 40), 100, (20, 40)),  # never enlarged
    ((20, 40), None, (20, 40)),
])
def test_packed_size(hw: tuple[int, int], max_size: int | None, want: tuple[int, int]) -> None:
    assert shards.packed_size(*hw, max_size) == want


def test_manifest_records_the_packing_scale(tmp_path: Path) -> None:
    for i, hw in enumerate([(33, 50), (50, 33), (10, 12)]):
        _save(tmp_path / f"images/{i}.png", Image.new("RGB", hw[::-1], (i, i, i)))
        _mask(tmp_path / f"masks/{i}.png", np.zeros(hw, np.uint8))
    assert _pack(tmp_path, "--max-size", "20") == 0
    out = tmp_path / "out"
    manifest = shards.load_manifest(out)
    assert manifest["max_size"] == 20
    sizes = {s["meta"]["source"]: s["image"].shape[:2] for s in iter_samples(shards.shard_urls(out, manifest, "train"))}
    assert sizes == {"0.png": (13, 20), "1.png": (20, 13), "2.png": (10, 12)}
    size = manifest["splits"]["train"]["image_size"]
    assert size["mean_hw"] == [14.3, 15.0] and size["original_mean_hw"] == [31.0, 31.7]
    # Another split must share the scale; the same scale joins.
    options = {"images": tmp_path / "images", "masks": tmp_path / "masks", "out": out, "num_classes": 2,
               "split": "val", "workers": 1}
    with pytest.raises(PackError, match="max_size is 20 for splits \\['train'\\], this pack has None"):
        pack(PackOptions(**options))
    assert pack(PackOptions(**options, max_size=20)).manifest["max_size"] == 20
    # A folder packed before the scale was recorded cannot tell whether a new split matches it.
    raw = json.loads((out / shards.MANIFEST).read_text())
    del raw["max_size"]
    (out / shards.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(PackError, match="packed before seg_dist recorded --max-size"):
        pack(PackOptions(**{**options, "split": "test"}, max_size=20))
