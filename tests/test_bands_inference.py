"""Inference takes what training takes: predict, evaluate, export and the pictures on the synthetic 4-band
(classes differ only in the fourth, near-infrared band) and 16-bit grey (classes differ only below 8 bits)
sets, trained briefly on the CPU. Real files (TIFF, .npy, 16-bit PNG), real commands."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import REPO, png_bytes, save_tiny_checkpoint, tiny_overrides
from PIL import Image

from seg_dist import checkpoint, data, distributed, evaluate, exporting, predict, preview, shards, synthetic
from seg_dist.config import ModelConfig, load_config
from seg_dist.errors import UserError
from seg_dist.export import main as export_main
from seg_dist.inference import Predictor, resize_image
from seg_dist.pack import PackOptions, pack
from seg_dist.trainer import train
from seg_dist.visualize import display_image, enlarge, validation_pictures

SIZE = 32
# torch 2.13 deprecates torch.jit (script/load warn); TorchScript is one of the export formats.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]


def _pack(files: Path, out: Path, **kw) -> dict:
    options = PackOptions(images=files / "images", masks=files / "masks", out=out,
                          num_classes=len(synthetic.BAND_CLASS_NAMES), val_fraction=0.25, workers=1,
                          samples_per_shard=16, **kw)
    return pack(options).manifest


@pytest.fixture(scope="module", params=["bands4", "grey16"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A short training run on the set (48 train, 16 val samples of 32 px): its shards, checkpoint, run folder
    and final validation metrics. The 4-band run shows band 3 (near infrared) in its pictures."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    files = synthetic.generate(root / "files", 64, SIZE, seed=3, kind=kind)
    _pack(files, root / "shards")
    shown = ["data.display_bands=[3]"] if kind == "bands4" else []
    overrides = tiny_overrides(root / "shards", root / "run", "train.epochs=4", "train.batch_size=8", "optim.lr=1e-2",
                               "model.depth=2", "train.ema_decay=0", "train.amp=off", "logging.tensorboard=false",
                               "logging.overlays=1", *shown)
    result = train(load_config(REPO / "configs" / "default.yaml", overrides), distributed.DistEnv(),
                   torch.device("cpu"))
    return {"kind": kind, "shards": root / "shards", "run": root / "run", "metrics": result.metrics,
            "checkpoint": root / "run" / "checkpoints" / "last.pt"}


def _new_image(kind: str, index: int, hw: tuple[int, int]) -> np.ndarray:
    """A new image of the set's kind (not in the shards), cut to `hw` so that sizes are not square."""
    image, _ = synthetic.render_bands(1000 + index, max(hw), 3, kind)
    image = image[: hw[0], : hw[1]]
    return image if image.ndim == 3 else image[:, :, None]


def _model_masks(ckpt: Path, image: np.ndarray) -> np.ndarray:
    """The model called directly on the image normalised by the checkpoint's constants, in its own type."""
    trained = checkpoint.load_model(ckpt, torch.device("cpu"))
    x = data.normalize(torch.from_numpy(image), trained.input.mean, trained.input.std)
    with torch.no_grad():
        return trained.model(x[None])[0].argmax(0).numpy()


def test_the_checkpoint_records_the_input_and_old_ones_default_to_8_bit_rgb(trained: dict, tmp_path: Path) -> None:
    manifest = shards.load_manifest(trained["shards"])
    model = checkpoint.load_model(trained["checkpoint"], torch.device("cpu"))
    channels = 4 if trained["kind"] == "bands4" else 1
    assert model.image == shards.ImageSpec(channels, "uint16")
    assert model.input.to_dict()["raw_mean"] == pytest.approx(manifest["image"]["mean"])
    assert model.cfg.model.in_channels == channels and model.cfg.data.mean == list(model.input.mean)
    # A checkpoint from before the input was recorded: model.in_channels (0: 3), 8 bits, data.mean/std.
    old = save_tiny_checkpoint(tmp_path / "old.pt", ModelConfig(width=8, depth=2), ["a", "b"], [0.5, 0.4, 0.3],
                               [0.2, 0.2, 0.2], global_step=1)
    loaded = checkpoint.load_model(old, torch.device("cpu"))
    assert (loaded.input.channels, loaded.input.dtype, loaded.input.mean) == (3, "uint8", (0.5, 0.4, 0.3))
    assert loaded.image == shards.RGB8 and loaded.cfg.model.in_channels == 3


def test_predict_writes_the_models_masks_at_each_images_size(trained: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    kind, ckpt = trained["kind"], trained["checkpoint"]
    src = tmp_path / "in"
    src.mkdir()
    images = {}
    if kind == "bands4":
        images["scene.tif"] = _new_image(kind, 0, (37, 45))
        tifffile.imwrite(src / "scene.tif", images["scene.tif"], photometric="minisblack", planarconfig="contig")
        images["planar.tiff"] = _new_image(kind, 1, (29, 40))
        tifffile.imwrite(src / "planar.tiff", images["planar.tiff"].transpose(2, 0, 1), photometric="minisblack",
                         planarconfig="separate")
        images["array.npy"] = _new_image(kind, 2, (41, 33))
        np.save(src / "array.npy", images["array.npy"])
    else:
        for i, hw in enumerate([(37, 45), (29, 40)]):
            images[f"grey{i}.png"] = _new_image(kind, i, hw)
            (src / f"grey{i}.png").write_bytes(png_bytes(images[f"grey{i}.png"][:, :, 0]))
        images["array.npy"] = _new_image(kind, 2, (41, 33))
        np.save(src / "array.npy", images["array.npy"][:, :, 0])  # H x W
    # An 8-bit RGB photo is not what these models take: named with both kinds, skipped, the rest written.
    (src / "photo.png").write_bytes(png_bytes(np.full((20, 24, 3), 90, np.uint8)))
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "out"),
                         "--overlay"]) == 1
    err = capsys.readouterr().err
    want = "4-channel uint16" if kind == "bands4" else "1-channel uint16"
    assert (f"error: {src / 'photo.png'}: a 3-channel uint8 image, but the model was trained on {want} images; "
            "skipped") in err.splitlines()
    for name, image in images.items():
        stem = Path(name).stem
        mask = np.array(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert mask.shape == image.shape[:2]
        assert np.array_equal(mask, _model_masks(ckpt, image))
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.png").size[0] >= 3 * image.shape[1]
    assert not (tmp_path / "out" / "photo.png").exists()
    # The trained model tells the classes apart on new images too: the bits and bands reached it.
    truth = synthetic.render_bands(1000, 45, 3, kind)[1][:37, :45]
    first = "scene" if kind == "bands4" else "grey0"
    assert (np.array(Image.open(tmp_path / "out" / f"{first}.png")) == truth).mean() > 0.6


def test_evaluate_gives_the_trainers_last_validation(trained: dict, tmp_path: Path) -> None:
    """Evaluate reads the split through `data.split_samples` in the images' own type and runs the Predictor on
    each image at its size; validation ran the same model on padded batches of the same 32 px images
    (no padding needed), so the figures agree to float rounding of the batched convolutions."""
    report = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(trained["checkpoint"]), "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    last = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert figures["samples"] == 16 and figures["split"] == "val"
    assert figures["miou"] == pytest.approx(trained["metrics"]["miou"], abs=1e-6)
    assert figures["pixel_accuracy"] == pytest.approx(trained["metrics"]["pixel_accuracy"], abs=1e-6)
    assert figures["loss"] == pytest.approx(trained["metrics"]["loss"], rel=1e-4)
    assert any(v == pytest.approx(figures["miou"], abs=1e-6) for v in last.values() if isinstance(v, float))


def test_evaluate_refuses_data_of_another_kind(trained: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for i in range(2):  # 8-bit RGB photos of the same three classes
        (tmp_path / f"images/{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), 40 * i, np.uint8)))
        (tmp_path / f"masks/{i}.png").write_bytes(png_bytes(np.full((8, 8), i, np.uint8)))
    pack(PackOptions(images=tmp_path / "images", masks=tmp_path / "masks", out=tmp_path / "rgb", split="val",
                     num_classes=3, class_names=list(synthetic.BAND_CLASS_NAMES), workers=1))
    args = ["--checkpoint", str(trained["checkpoint"]), "--data", str(tmp_path / "rgb")]
    capsys.readouterr()
    assert evaluate.main(args) == 2
    want = "4-channel uint16" if trained["kind"] == "bands4" else "1-channel uint16"
    out = capsys.readouterr()
    line = (out.err + out.out).strip().splitlines()[-1]
    assert re.search(rf"manifest.json: 3-channel uint8 images, but .* was trained on {want} "
                     "images: evaluate on data of the checkpoint's kind$", line), line


def test_torchscript_export_of_a_4_band_model_takes_uint16(trained: dict, tmp_path: Path) -> None:
    if trained["kind"] != "bands4":
        pytest.skip("the 4-band model")
    ckpt = trained["checkpoint"]
    out = tmp_path / "model.pt"
    assert export_main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    meta = json.loads(exporting.metadata_path(out).read_text())
    manifest = shards.load_manifest(trained["shards"])
    assert meta["input"]["channels"] == 4 and meta["input"]["dtype"] == meta["input"]["tensor_dtype"] == "uint16"
    assert meta["input"]["raw_mean"] == pytest.approx(manifest["image"]["mean"])
    assert meta["input"]["raw_std"] == pytest.approx(manifest["image"]["std"])
    assert meta["scale"] == pytest.approx(1 / 65535) and meta["model"]["in_channels"] == 4
    scripted = torch.jit.load(str(out))
    images = np.stack([_new_image("bands4", 10 + i, (33, 47)) for i in range(2)])
    model = checkpoint.load_model(ckpt, torch.device("cpu"))
    x = data.normalize(torch.from_numpy(images), model.input.mean, model.input.std)
    with torch.no_grad():
        eager = model.model(x)
        got = scripted(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert got.shape == eager.shape and (got - eager).abs().max().item() <= exporting.ATOL
    assert torch.equal(got.argmax(1), eager.argmax(1))

    # float32 is the fallback input: the same pixel values as floats, said in the JSON.
    floats = tmp_path / "float.pt"
    assert export_main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(floats),
                        "--input-dtype", "float32"]) == 0
    assert json.loads(exporting.metadata_path(floats).read_text())["input"]["tensor_dtype"] == "float32"
    with torch.no_grad():
        got = torch.jit.load(str(floats))(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert (got - eager).abs().max().item() <= exporting.ATOL
    # 8 bits would cut the values: refused, nothing written.
    with pytest.raises(UserError, match="trained on uint16 pixels"):
        exporting.export(ckpt, tmp_path / "u8.pt", "torchscript", input_dtype="uint8")
    assert not (tmp_path / "u8.pt").exists()


def test_a_16_bit_validation_picture_is_stretched_and_shows_the_display_bands(trained: dict) -> None:
    kind = trained["kind"]
    manifest = shards.load_manifest(trained["shards"])
    first = min(data.iter_samples(shards.shard_urls(trained["shards"], manifest, "val")), key=lambda s: s["key"])
    image, mask = first["image"], first["mask"]
    assert image.dtype == np.uint16
    # Plain 16-bit-to-8-bit scaling would leave these pictures a few levels of near-black; the stretch uses
    # the whole range.
    bands = [3] if kind == "bands4" else None
    shown = display_image(image, bands)
    assert shown.dtype == np.uint8 and shown.shape == (SIZE, SIZE, 3)
    if kind == "grey16":  # values 4096-4351
        assert len(np.unique(np.rint(image / 257))) <= 2
    assert shown.min() == 0 and shown.max() == 255 and len(np.unique(shown)) > 60
    assert np.array_equal(shown[:, :, 0], shown[:, :, 1])  # one band: grey
    # The trainer's picture of the split's first sample shows exactly that (enlarged by pixel repeats to
    # 160 px), so data.display_bands reached it.
    with Image.open(trained["run"] / "overlays" / "val_000.png") as im:
        picture = np.array(im.convert("RGB"))
    assert _contains(picture, enlarge(shown, 160))
    pred = torch.zeros(mask.shape, dtype=torch.int64)
    (again,) = validation_pictures([(torch.from_numpy(image), torch.from_numpy(mask), pred)], [0.0], [1.0], 3,
                                   display_bands=bands, raw=True, dtype="uint16")
    assert _contains(again, enlarge(shown, 160))
    if kind == "bands4":  # bands 0-2 (the default) show another picture than band 3
        assert not _contains(validation_pictures([(torch.from_numpy(image), torch.from_numpy(mask), pred)], [0.0],
                                                 [1.0], 3)[0], enlarge(shown, 160))


def _contains(picture: np.ndarray, panel: np.ndarray) -> bool:
    """Whether `panel` lies in `picture`, pixel for pixel."""
    h, w = panel.shape[:2]
    ys, xs = np.nonzero((picture == panel[0, 0]).all(axis=2))
    return any(np.array_equal(picture[y : y + h, x : x + w], panel) for y, x in zip(ys, xs, strict=True))


def test_display_bands_stretch_per_band_and_a_bad_index_is_one_line(trained: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((8, 10, 4), np.float32)
    image[:, :, 1] = rng.normal(1e4, 5, (8, 10))  # a narrow range far from 0: stretched to 0-255
    image[:, :, 3] = np.linspace(-2, 3, 80).reshape(8, 10)
    shown = display_image(image, [3, 1, 0])
    assert shown[:, :, 0].min() == 0 and shown[:, :, 0].max() == 255 and shown[:, :, 1].max() == 255
    assert (shown[:, :, 2] == 128).all()  # a flat band: mid grey
    assert shown[0, 0, 0] < shown[-1, -1, 0]
    # 8-bit RGB stays exactly as it is.
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(display_image(rgb), rgb)
    with pytest.raises(UserError, match=r"data.display_bands=\[4\]: the images have 4 channel\(s\)"):
        display_image(image, [4])
    if trained["kind"] == "bands4":
        model = checkpoint.load_model(trained["checkpoint"], torch.device("cpu"), ["data.display_bands=[0,1,5]"])
        with pytest.raises(UserError, match=r"data.display_bands=\[0, 1, 5\]"):
            Predictor.from_trained(model)
        out = tmp_path / "preview.png"
        assert preview.main(["--out", str(out), "--n", "2", f"data.root={trained['shards']}",
                             "data.display_bands=[3,2,1]"]) == 0
        assert Image.open(out).size[0] > 100


def test_the_packing_scale_is_brought_about_as_pack_brings_it(tmp_path: Path) -> None:
    """A deep image larger than the packing scale runs at the size and with the pixels pack stored for it
    (OpenCV's area filter in its own type), so the model sees new images as it saw the training ones."""
    files = synthetic.generate(tmp_path / "files", 4, SIZE, seed=3, kind="bands4")
    manifest = _pack(files, tmp_path / "out", max_size=16)
    sample = next(data.iter_samples(shards.shard_urls(tmp_path / "out", manifest, "train")))
    original = tifffile.imread(files / "images" / sample["meta"]["source"])
    assert np.array_equal(resize_image(original, 16, 16), sample["image"])
    spec = shards.ImageSpec(4, "uint16")
    p = Predictor(torch.nn.Conv2d(4, 3, 1), load_config(None, ["data.mean=[0.1,0.1,0.1,0.1]",
                                                                "data.std=[0.2,0.2,0.2,0.2]"]).data,
                  3, ["a", "b", "c"], torch.device("cpu"), max_size=16, spec=spec)
    assert torch.equal(p._to_tensor(original), data.normalize(torch.from_numpy(sample["image"]), p.data.mean,
                                                             p.data.std))
    assert p(original).shape == original.shape[:2]
    # More than 4 bands at a whole-number factor, which OpenCV's area filter takes 4 at a time.
    many = np.random.default_rng(0).integers(0, 65536, (20, 30, 9)).astype(np.uint16)
    small = resize_image(many, 10, 15)
    assert small.shape == (10, 15, 9) and small.dtype == np.uint16
    assert abs(int(small[0, 0, 8]) - many[:2, :2, 8].astype(np.float64).mean()) <= 0.5


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="onnx, onnxscript and onnxruntime (pip install 'seg_dist[export]')")
def test_onnx_export_takes_uint16_and_falls_back_to_float32(trained: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if trained["kind"] != "grey16":
        pytest.skip("one ONNX export is enough: the 16-bit grey model")
    import onnxruntime as ort

    ckpt = trained["checkpoint"]
    images = np.stack([_new_image("grey16", 20 + i, (21, 27)) for i in range(2)])
    model = checkpoint.load_model(ckpt, torch.device("cpu"))
    with torch.no_grad():
        eager = model.model(data.normalize(torch.from_numpy(images), model.input.mean, model.input.std))
    nchw = images.transpose(0, 3, 1, 2).copy()
    out = tmp_path / "model.onnx"
    result = exporting.export(ckpt, out, "onnx")
    assert result.check.skipped is None and result.check.ok
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint16)"
    got = torch.from_numpy(session.run(None, {"image": nchw})[0])
    assert (got - eager).abs().max().item() <= exporting.ATOL

    # Where the exporter cannot take a uint16 input, the file takes the same values as float32, and says so.
    export_onnx = exporting._export_onnx

    def no_uint16(module, path, dtype, device, opset):
        if dtype == torch.uint16:
            raise exporting.RunFailed("ONNX export failed: no uint16 here")
        return export_onnx(module, path, dtype, device, opset)

    monkeypatch.setattr(exporting, "_export_onnx", no_uint16)
    fallback = tmp_path / "fallback.onnx"
    exporting.export(ckpt, fallback, "onnx")
    meta = json.loads(exporting.metadata_path(fallback).read_text())["input"]
    assert meta["dtype"] == "uint16" and meta["tensor_dtype"] == "float32" and "no uint16 here" in meta["tensor_note"]
    session = ort.InferenceSession(str(fallback), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": nchw.astype(np.float32)})[0])
    assert (got - eager).abs().max().item() <= exporting.ATOL
