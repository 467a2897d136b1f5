"""Images of any channel count and bit depth reach the model whole: the synthetic 16-bit grey set (classes
differ only in bits that 8-bit decoding drops) and 4-band set (classes differ only in the fourth band) pack
with exact statistics and train to a high validation mIoU; normalisation and input channels come from the
manifest; augmentation keeps every band and bit. Real PNG/TIFF files, real training on tiny sizes."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import REPO, png_bytes, tiny_overrides
from PIL import Image

from seg_dist import data, distributed, shards, synthetic
from seg_dist.config import load_config
from seg_dist.errors import UserError
from seg_dist.pack import PackError, PackOptions, pack
from seg_dist.trainer import train

SIZE = 32


def _generate(root: Path, kind: str, n: int) -> Path:
    return synthetic.generate(root / "files", n, SIZE, seed=3, kind=kind)


def _pack(files: Path, out: Path, workers: int = 2, **kw) -> dict:
    options = PackOptions(images=files / "images", masks=files / "masks", out=out,
                          num_classes=len(synthetic.BAND_CLASS_NAMES), val_fraction=0.25, workers=workers,
                          samples_per_shard=10, **kw)
    return pack(options).manifest


@pytest.fixture(scope="module", params=["grey16", "bands4"])
def band_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(kind, the generated files, the packed shards): 64 samples, 48 train and 16 val."""
    root = tmp_path_factory.mktemp(request.param)
    files = _generate(root, request.param, 64)
    _pack(files, root / "shards")
    return request.param, files, root / "shards"


def _raw(path: Path) -> np.ndarray:
    """A generated file read without seg_dist's decoder."""
    if path.suffix == ".tif":
        return tifffile.imread(path)
    return np.array(Image.open(path))


def test_eight_bit_decoding_would_lose_the_classes() -> None:
    # Why the sets prove anything: whatever survives 8-bit decoding is alike for every class.
    grey, labels = zip(*(synthetic.render_bands(i, SIZE, 3, "grey16") for i in range(8)), strict=True)
    image, label = np.stack(grey), np.stack(labels)
    assert image.dtype == np.uint16 and set(np.unique(label)) == {0, 1, 2}
    for eight_bit in (image >> 8, np.clip(image, 0, 255)):
        per_class = [set(np.unique(eight_bit[label == c]).tolist()) for c in range(3)]
        assert per_class[0] == per_class[1] == per_class[2] and len(per_class[0]) == 1
    # ... while the 16-bit values tell the classes apart.
    means = [image[label == c].mean() for c in range(3)]
    assert means[1] - means[0] > 60 and means[2] - means[1] > 60

    bands, labels = zip(*(synthetic.render_bands(i, SIZE, 3, "bands4") for i in range(64)), strict=True)
    image, label = np.stack(bands).astype(np.float64), np.stack(labels)
    assert image.shape[-1] == 4
    for band in range(4):
        means = np.array([image[..., band][label == c].mean() for c in range(3)])
        spread = image[..., band].std()
        if band < 3:  # red, green, blue: one texture drawn without looking at the labels
            assert np.ptp(means) < 0.1 * spread, (band, means, spread)
        else:  # near infrared: classes apart by more than the band's whole spread
            assert np.diff(means).min() > spread, (means, spread)


def test_manifest_records_kind_and_exact_statistics(band_set: tuple[str, Path, Path]) -> None:
    kind, files, out = band_set
    manifest = shards.load_manifest(out)
    channels = 1 if kind == "grey16" else 4
    entry = manifest["image"]
    assert (entry["channels"], entry["dtype"]) == (channels, "uint16") and "alpha" not in entry
    assert shards.image_spec(manifest) == shards.ImageSpec(channels, "uint16")
    # The original bytes are stored (PNG for grey, TIFF for bands), named by their format.
    sample = next(data.read_shard(shards.shard_urls(out, manifest, "train")[0]))
    source = json.loads(sample["json"])["source"]
    assert sample["png" if kind == "grey16" else "tif"] == (files / "images" / source).read_bytes()
    # Statistics of every train pixel, measured by the 2 packer processes and merged, equal numpy's.
    sources = [s["meta"]["source"] for s in data.iter_samples(shards.shard_urls(out, manifest, "train"))]
    assert len(sources) == 48
    pixels = np.stack([_raw(files / "images" / s) for s in sources]).reshape(-1, channels).astype(np.float64)
    np.testing.assert_allclose(entry["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(entry["std"], pixels.std(0), rtol=1e-9)
    # And the loader yields those pixels, every bit, in their own type.
    first = next(data.iter_samples(shards.shard_urls(out, manifest, "train")))
    raw = _raw(files / "images" / first["meta"]["source"])
    assert first["image"].dtype == np.uint16 and np.array_equal(first["image"].reshape(raw.shape), raw)


def test_each_set_trains_to_a_high_miou(band_set: tuple[str, Path, Path], tmp_path: Path) -> None:
    kind, _, out = band_set
    overrides = tiny_overrides(out, tmp_path / "run", "train.epochs=14", "train.batch_size=8", "optim.lr=1e-2",
                               "model.depth=2", "train.ema_decay=0", "logging.tensorboard=false", "logging.overlays=0")
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    result = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    assert result.metrics["miou"] > 0.8, result.history
    assert result.model.in_channels == (1 if kind == "grey16" else 4)  # model.in_channels=0: from the data
    saved = load_config(tmp_path / "run" / "config.yaml")
    norm = data.resolve_normalization(cfg, shards.load_manifest(out))
    assert norm.source == "manifest" and saved.data.mean == list(norm.mean) and saved.model.in_channels > 0


def test_loader_workers_give_the_same_batches(band_set: tuple[str, Path, Path]) -> None:
    _, _, out = band_set
    manifest = shards.load_manifest(out)
    batches = []
    for workers in (0, 2):
        cfg = data.resolve_inputs(load_config(None, [f"data.root={out}", "data.image_size=24", "train.batch_size=4",
                                                     f"data.workers={workers}", "data.augment.vflip=0.5"]), manifest)
        batches.append(list(data.train_loader(cfg, manifest, str(out), 0, 1, epoch=1)))
    assert len(batches[0]) == len(batches[1]) == 12
    for (img0, mask0), (img2, mask2) in zip(*batches, strict=True):
        assert img0.dtype == torch.uint16 and img0.shape[1:3] == (24, 24)
        assert torch.equal(img0, img2) and torch.equal(mask0, mask2)
    # Validation batches keep the type and channels too, and normalise by the manifest's statistics.
    cfg = data.resolve_inputs(load_config(None, [f"data.root={out}"]), manifest)
    images, _, _, sizes = next(iter(data.val_loader(cfg, manifest, str(out), 0, 1)))
    x = data.normalize_padded(images, sizes, cfg.data.mean, cfg.data.std)
    assert x.dtype == torch.float32 and x.shape[1] == manifest["image"]["channels"]
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5


def test_normalize_takes_every_type_and_the_uint8_path_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    for dtype, full, channels in ((np.uint16, 65535.0, 4), (np.float32, 1.0, 13), (np.uint8, 255.0, 1)):
        if dtype == np.float32:
            images = (rng.standard_normal((2, 5, 6, channels)) * 300).astype(np.float32)
        else:
            images = rng.integers(0, int(full) + 1, (2, 5, 6, channels)).astype(dtype)
        mean, std = rng.uniform(0.1, 0.5, channels), rng.uniform(0.1, 0.3, channels)
        got = data.normalize(torch.from_numpy(images), mean.tolist(), std.tolist())
        want = (images.astype(np.float64) - full * mean) / (full * std)
        assert got.dtype == torch.float32 and got.shape == (2, channels, 5, 6)
        np.testing.assert_allclose(got.numpy(), want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-4)
    # 8-bit RGB: the arithmetic of before, bit for bit.
    images = torch.from_numpy(rng.integers(0, 256, (2, 5, 6, 3)).astype(np.uint8))
    mean, std = data.transforms.IMAGENET_MEAN, data.transforms.IMAGENET_STD
    shift = torch.tensor([255.0 * m for m in mean])
    scale = torch.tensor([1.0 / (255.0 * s) for s in std])
    assert torch.equal(data.normalize(images, mean, std), ((images.float() - shift) * scale).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="x 3 images"):
        data.normalize(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), mean, std)


def _manifest(channels: int, dtype: str, mean: list[float] | None = None, std: list[float] | None = None) -> dict:
    image: dict = {"channels": channels, "dtype": dtype}
    if mean is not None:
        image.update(mean=mean, std=std)
    return {"image": image}


def test_normalisation_and_input_channels_resolve_from_the_data() -> None:
    cfg = load_config(None, [])
    bands = _manifest(4, "uint16", [1000.0, 2000.0, 3000.0, 65535.0], [100.0, 200.0, 0.0, 6553.5])
    norm = data.resolve_normalization(cfg, bands)
    assert norm.source == "manifest" and (norm.channels, norm.dtype) == (4, "uint16")
    assert norm.mean == pytest.approx((1000 / 65535, 2000 / 65535, 3000 / 65535, 1.0))
    assert norm.std == pytest.approx((100 / 65535, 200 / 65535, 1.0, 0.1))  # a constant channel: std 1
    assert norm.to_dict()["raw_mean"] == pytest.approx([1000.0, 2000.0, 3000.0, 65535.0])
    resolved = data.resolve_inputs(cfg, bands)
    assert resolved.model.in_channels == 4 and resolved.data.mean == list(norm.mean)
    assert resolved.data.augment.photometric == "off"  # auto: no brightness shifts on 16-bit bands
    assert data.resolve_inputs(resolved, bands) == resolved  # resolved once, it stays
    # Explicit values override, in the type's full scale; a count that does not fit the data is one line.
    explicit = load_config(None, ["data.mean=[0.1,0.2,0.3,0.4]", "data.std=[1,1,1,1]"])
    assert data.resolve_normalization(explicit, bands).mean == (0.1, 0.2, 0.3, 0.4)
    with pytest.raises(UserError, match=r"data.mean has 3 and data.std 3 values, .* \(4-channel uint16 images\)"):
        data.resolve_normalization(load_config(None, ["data.mean=[0.1,0.2,0.3]", "data.std=[1,1,1]"]), bands)
    with pytest.raises(UserError, match=r"model.in_channels=3, but .* holds 4-channel uint16 images"):
        data.resolve_inputs(load_config(None, ["model.in_channels=3"]), bands)
    # A pretrained encoder on 8-bit RGB gets ImageNet's constants; without one, the data's own.
    rgb = _manifest(3, "uint8", [120.0, 110.0, 100.0], [50.0, 50.0, 50.0])
    smp = load_config(None, ["model.name=smp_unet", "model.encoder_weights=w.pt"])
    assert data.resolve_normalization(smp, rgb).source == "imagenet"
    assert data.resolve_normalization(cfg, rgb).mean == pytest.approx((120 / 255, 110 / 255, 100 / 255))
    assert data.resolve_inputs(cfg, rgb).data.augment.photometric == "on"
    # Manifests from before: 8-bit RGB with ImageNet's constants, as trained then.
    assert data.resolve_normalization(cfg, {}).mean == data.transforms.IMAGENET_MEAN
    with pytest.raises(UserError, match="no pixel statistics"):
        data.resolve_normalization(cfg, _manifest(4, "uint16"))


def test_geometric_augmentation_keeps_bands_and_bits_photometric_only_where_meaningful() -> None:
    rng = np.random.default_rng(1)
    cfg = load_config(None, ["data.image_size=24", "data.augment.affine=1", "data.augment.vflip=1",
                             "data.augment.brightness_contrast=1"]).data
    for spec, image in ((shards.ImageSpec(4, "uint16"), rng.integers(0, 65536, (30, 20, 4)).astype(np.uint16)),
                        (shards.ImageSpec(13, "float32"), (rng.random((30, 20, 13)) * 5000).astype(np.float32))):
        transform = data.build_transforms(cfg, True, 255, spec)
        assert not any("Brightness" in type(t).__name__ for t in transform.transforms)
        # A constant image keeps its value away from the padding (edges blend with the fill 0): no op rescaled
        # or clipped the values to 8 bits or to [0, 1].
        value = 40000 if spec.dtype == "uint16" else 4321.5
        out = transform(image=np.full_like(image, value), mask=np.zeros((30, 20), np.int64))
        assert out["image"].dtype == image.dtype and out["image"].shape == (24, 24, spec.channels)
        inside = out["image"][out["mask"] != 255]
        assert np.median(inside) == value and inside.max() == value
        turned = transform(image=image, mask=np.zeros((30, 20), np.int64))["image"]
        assert turned.dtype == image.dtype and turned.shape == (24, 24, spec.channels)
    on = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, photometric="on"))
    forced = data.build_transforms(on, True, 255, shards.ImageSpec(4, "uint16"))
    assert any("Brightness" in type(t).__name__ for t in forced.transforms)
    assert any("Brightness" in type(t).__name__ for t in data.build_transforms(cfg, True, 255).transforms)  # 8-bit RGB


def test_padding_and_rotation_fill_with_the_mean_so_new_pixels_normalise_to_zero() -> None:
    # 16-bit microscopy sits near 33,000 with a std of 250: a raw 0 border is -134 std after normalisation.
    mean, std = 33000 / 65535, 250 / 65535
    for channels in (1, 4, 6):
        cfg = load_config(None, ["data.image_size=24", "data.augment.affine=1", "data.augment.scale=[1.0,1.0]",
                                 f"data.mean={[mean] * channels}", f"data.std={[std] * channels}"]).data
        image = np.full((10, 12, channels), 33000, np.uint16)  # smaller than the crop: padded on every side
        out = data.build_transforms(cfg, True, 255, shards.ImageSpec(channels, "uint16"))(
            image=image, mask=np.zeros((10, 12), np.int64))
        x = data.normalize(torch.from_numpy(out["image"]), cfg.mean, cfg.std)
        assert (out["mask"] == 255).sum() > 24 * 24 // 2  # padding (and rotation) made new pixels ...
        assert x.abs().max() < 0.01, channels  # ... and they normalise to 0, as validation's padding does


def test_pack_settles_one_kind_per_dataset(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    rgb = np.dstack([grey, grey // 2, 255 - grey])
    (images / "a.png").write_bytes(png_bytes(rgb))
    (images / "b.png").write_bytes(png_bytes(rgb))
    (images / "c.png").write_bytes(png_bytes(grey))  # 8-bit grey among RGB: expanded, not refused
    for stem in "abc":
        (masks / f"{stem}.png").write_bytes(png_bytes(np.zeros((6, 8), np.uint8)))
    options = {"images": images, "masks": masks, "num_classes": 2, "workers": 1}
    manifest = pack(PackOptions(**options, out=tmp_path / "mixed")).manifest
    assert manifest["image"]["channels"] == 3
    expected = np.concatenate([rgb.reshape(-1, 3)] * 2 + [np.repeat(grey.reshape(-1, 1), 3, 1)]).astype(np.float64)
    np.testing.assert_allclose(manifest["image"]["mean"], expected.mean(0), rtol=1e-12)
    samples = {s["key"]: s["image"] for s in data.iter_samples(shards.shard_urls(tmp_path / "mixed", manifest,
                                                                                     "train"))}
    assert np.array_equal(samples["c"], np.repeat(grey[..., None], 3, 2))
    # A 16-bit image among them cannot be: a problem naming both kinds, nothing written.
    Image.fromarray(grey.astype(np.uint16) * 1000).save(images / "d.png")
    (masks / "d.png").write_bytes(png_bytes(np.zeros((6, 8), np.uint8)))
    with pytest.raises(PackError) as caught:
        pack(PackOptions(**options, out=tmp_path / "refused"))
    assert caught.value.problems == [(str(images / "d.png"), "a 1-channel uint16 image; every image of a dataset "
                                      "has the same channels and type, and 3 of this pack's images are (or become) "
                                      "3-channel uint8")]
    assert not (tmp_path / "refused").exists()
    # A split added to a folder must match the folder's kind.
    (images / "d.png").unlink()
    with pytest.raises(PackError, match=r"packed without --keep-alpha"):
        pack(PackOptions(**options, out=tmp_path / "mixed", split="val", keep_alpha=True))


def test_keep_alpha_keeps_the_fourth_channel(tmp_path: Path) -> None:
    rgba = np.dstack([np.full((6, 8, 3), 90, np.uint8), np.arange(48, dtype=np.uint8).reshape(6, 8)])
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images/a.png").write_bytes(png_bytes(rgba))
    (tmp_path / "masks/a.png").write_bytes(png_bytes(np.zeros((6, 8), np.uint8)))
    options = {"images": tmp_path / "images", "masks": tmp_path / "masks", "num_classes": 2, "workers": 1}
    dropped = pack(PackOptions(**options, out=tmp_path / "rgb")).manifest
    kept = pack(PackOptions(**options, out=tmp_path / "rgba", keep_alpha=True)).manifest
    assert dropped["image"]["channels"] == 3 and "alpha" not in dropped["image"]
    assert kept["image"] == {"channels": 4, "dtype": "uint8", "alpha": True, "mean": [90.0, 90.0, 90.0, 23.5],
                             "std": pytest.approx([0.0, 0.0, 0.0, float(np.arange(48).std())])}
    sample = next(data.iter_samples(shards.shard_urls(tmp_path / "rgba", kept, "train")))
    assert np.array_equal(sample["image"], rgba)


def test_max_size_resizes_deep_images_losslessly_into_npy(tmp_path: Path) -> None:
    files = _generate(tmp_path, "bands4", 4)
    manifest = _pack(files, tmp_path / "out", workers=1, max_size=16)
    sample = next(data.read_shard(shards.shard_urls(tmp_path / "out", manifest, "train")[0]))
    stored = np.load(io.BytesIO(sample["npy"]))
    assert stored.dtype == np.uint16 and stored.shape == (16, 16, 4)
    decoded = next(data.iter_samples(shards.shard_urls(tmp_path / "out", manifest, "train")))
    assert np.array_equal(decoded["image"], stored) and decoded["mask"].shape == (16, 16)
