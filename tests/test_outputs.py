"""No command writes over its own inputs, even with --overwrite; existing outputs need --overwrite; reports are
strict JSON; evaluate refuses data of other classes than its checkpoint's. Every case runs the real command
in-process through `cli.run` and checks the exit code, the one line naming the file, and the input's bytes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png_bytes, save_tiny_checkpoint
from PIL import Image

from seg_dist import checkpoint, evaluate, export, outputs, predict, preview, synth, synthetic
from seg_dist.config import ModelConfig
from seg_dist.errors import UserError
from seg_dist.pack.__main__ import main as pack_main
from seg_dist.runlog import HANDLER_NAME

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """All the command printed: one line, the refusal (evaluate logs it with its rank prefix)."""
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture(autouse=True)
def _no_log_handler_left() -> Iterator[None]:
    """evaluate installs seg_dist's log handler on the root logger (writing to the test's stdout); remove it,
    so that the next command reports on stderr as a fresh process would."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)


def _checkpoint(path: Path, classes: int = 6, ignore_index: int = 255, **config: str) -> Path:
    """A width-8, depth-3 U-Net checkpoint; `config` edits its stored config (section.key=value)."""
    save_tiny_checkpoint(path, ModelConfig(width=8, depth=3), [f"c{i}" for i in range(classes)], MEAN, STD,
                         global_step=3)
    state = checkpoint.load(path)
    state["ignore_index"] = ignore_index
    for key, value in config.items():
        section, name = key.split(".")
        state["config"][section][name] = value
    checkpoint.save(path, state)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ck") / "ck.pt")


# --- evaluate -------------------------------------------------------------------------------------


def test_evaluate_json_onto_its_checkpoint_is_refused_even_with_overwrite(ckpt, tiny_shards, tmp_path, capsys):
    before = _sha(ckpt)
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    for target, extra in ((str(ckpt), []), (str(ckpt), ["--overwrite"]), (str(link), ["--overwrite"])):
        rc = evaluate.main(["--checkpoint", str(ckpt), "--json", target, *extra, f"data.root={tiny_shards}"])
        line = _one_line(capsys)
        assert rc == 2
        assert f"--json {target} is the checkpoint being evaluated (--checkpoint {ckpt})" in line
        assert _sha(ckpt) == before
    # The data's manifest is an input too, and so is a shard.
    manifest = tiny_shards / "manifest.json"
    before = _sha(manifest)
    assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(manifest), "--overwrite",
                          f"data.root={tiny_shards}"]) == 2
    assert "is the manifest of the data being evaluated" in _one_line(capsys)
    assert _sha(manifest) == before


def test_evaluate_existing_report_needs_overwrite(ckpt, tiny_shards, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("keep")
    assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(report), f"data.root={tiny_shards}"]) == 2
    line = _one_line(capsys)
    assert f"{report}: exists (the JSON report" in line and "--overwrite" in line
    assert report.read_text() == "keep"


def _two_class_shards(root: Path, tmp_path: Path) -> Path:
    """A val split of 3-class data whose masks hold classes 0 and 1 only: class 2 is never in the truth."""
    images, masks = tmp_path / "src" / "images", tmp_path / "src" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        (images / f"s{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
        mask = np.zeros((24, 24), np.uint8)
        mask[:, 12:] = 1
        (masks / f"s{i}.png").write_bytes(png_bytes(mask))
    assert pack_main(["--images", str(images), "--masks", str(masks), "--num-classes", "3", "--split", "val",
                      "--out", str(root), "--workers", "1"]) == 0
    return root


def test_evaluate_report_is_strict_json_with_null_for_undefined_figures(tmp_path, capsys):
    root = _two_class_shards(tmp_path / "shards", tmp_path)
    ck = tmp_path / "ck3.pt"
    save_tiny_checkpoint(ck, ModelConfig(width=8, depth=3), ["a", "b", "c"], MEAN, STD, global_step=1)
    state = checkpoint.load(ck)
    state["model"]["head.bias"] = torch.tensor([50.0, 0.0, -50.0])  # predicts class 0 (and never class 2)
    checkpoint.save(ck, state)
    report = tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(ck), "--json", str(report), f"data.root={root}"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    figures = json.loads(report.read_text(), parse_constant=refuse)
    assert figures["per_class_iou"][2] is None and figures["per_class_dice"][2] is None  # in neither
    assert figures["per_class_iou"][0] == pytest.approx(0.5) and figures["per_class_iou"][1] == 0.0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last, parse_constant=refuse)["samples"] == 4


def test_json_text_turns_non_finite_numbers_into_null():
    text = outputs.json_text({"a": math.nan, "b": [np.float32("inf"), 1.5], "c": np.array([np.nan, 2.0])})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [None, 2.0]}


@pytest.mark.parametrize(("classes", "ignore", "overrides", "expected"), [
    (4, 255, [], "6 classes with ignore index 255, but {ck} was trained for 4 classes with ignore index 255"),
    (6, 250, [], "6 classes with ignore index 255, but {ck} was trained for 6 classes with ignore index 250"),
    (6, 255, ["data.num_classes=8"], "8 classes with ignore index 255 (data.num_classes=8), but {ck} was trained "
                                     "for 6 classes"),
])
def test_evaluate_refuses_data_of_other_classes_before_the_first_batch(classes, ignore, overrides, expected,
                                                                       tiny_shards, tmp_path, capsys):
    ck = _checkpoint(tmp_path / "ck.pt", classes, ignore)
    report = tmp_path / "r.json"
    rc = evaluate.main(["--checkpoint", str(ck), "--json", str(report), f"data.root={tiny_shards}", *overrides])
    line = _one_line(capsys)
    assert rc == 2
    assert f"{tiny_shards / 'manifest.json'}: " + expected.format(ck=ck) in line
    assert not report.exists()


# --- predict --------------------------------------------------------------------------------------


def _images(folder: Path, n: int = 3, side: int = 20) -> dict[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side + i, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return {p: _sha(p) for p in sorted(folder.iterdir())}


def test_predict_into_its_own_input_folder_is_refused_and_calls_the_image_an_image(ckpt, tmp_path, capsys):
    src = tmp_path / "photos"
    hashes = _images(src)
    for extra in ([], ["--overwrite"]):
        rc = predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(src), *extra])
        line = _one_line(capsys)
        assert rc == 2
        assert f"is the input image {src / 'im0.png'} (--input {src})" in line and "exists (the mask" not in line
        assert {p: _sha(p) for p in hashes} == hashes and sorted(src.iterdir()) == list(hashes)
    # The same folder reached through `..` and a symlink.
    (tmp_path / "alias").symlink_to(src)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out",
                         str(tmp_path / "alias" / ".." / "photos"), "--overwrite"]) == 2
    assert "is the input image" in _one_line(capsys)
    assert {p: _sha(p) for p in hashes} == hashes


def test_predict_names_an_existing_mask_and_overlay_by_what_they_are(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, n=2)
    out.mkdir()
    (out / "im1_overlay.png").write_bytes(b"keep")
    args = ["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out), "--overlay"]
    assert predict.main(args) == 2
    line = _one_line(capsys)
    assert f"{out / 'im1_overlay.png'}: exists (the overlay of {src / 'im1.png'}" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["im1_overlay.png"]
    (out / "im1_overlay.png").unlink()
    (out / "im0.png").write_bytes(b"keep")
    assert predict.main(args) == 2
    assert f"{out / 'im0.png'}: exists (the mask of {src / 'im0.png'}" in _one_line(capsys)
    assert predict.main([*args, "--overwrite"]) == 0
    assert (out / "im0.png").read_bytes() != b"keep"


def test_predict_onto_the_checkpoint_is_refused(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    _images(src, n=1)
    before = _sha(ckpt)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(ckpt), "--overwrite"]) == 2
    assert f"--out {ckpt} is the checkpoint the masks come from" in _one_line(capsys)
    assert _sha(ckpt) == before


# --- export, preview, pack, synth -------------------------------------------------------------------


def test_export_onto_its_checkpoint_is_refused_even_with_overwrite(ckpt, tmp_path, capsys, monkeypatch):
    before = _sha(ckpt)
    monkeypatch.chdir(ckpt.parent)
    for out in (str(ckpt), "ck.pt", f"../{ckpt.parent.name}/ck.pt"):
        assert export.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", out, "--overwrite"]) == 2
        line = _one_line(capsys)
        assert f"--out {Path(out)} is the checkpoint being exported (--checkpoint {ckpt})" in line
        assert _sha(ckpt) == before
    # Nor may its metadata JSON land on the checkpoint.
    meta_target = ckpt.parent / "m.pt.json"
    meta_target.write_bytes(ckpt.read_bytes())
    before = _sha(meta_target)
    assert export.main(["--checkpoint", str(meta_target), "--format", "torchscript", "--out",
                        str(ckpt.parent / "m.pt"), "--overwrite"]) == 2
    assert "(the exported model's metadata JSON) is the checkpoint being exported" in _one_line(capsys)
    assert _sha(meta_target) == before and not (ckpt.parent / "m.pt").exists()


def test_preview_onto_its_config_or_data_is_refused(tiny_shards, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {tiny_shards}\n")
    manifest = tiny_shards / "manifest.json"
    hashes = {config: _sha(config), manifest: _sha(manifest)}
    assert preview.main(["--config", str(config), "--out", str(config), "--overwrite"]) == 2
    assert f"--out {config} is the config (--config {config})" in _one_line(capsys)
    assert preview.main(["--config", str(config), "--out", str(manifest), "--overwrite"]) == 2
    assert f"--out {manifest} is the manifest of the data previewed" in _one_line(capsys)
    assert {p: _sha(p) for p in hashes} == hashes
    picture = tmp_path / "p.png"
    picture.write_bytes(b"keep")
    assert preview.main(["--config", str(config), "--out", str(picture), "--n", "2"]) == 2
    assert f"{picture}: exists (the preview picture" in _one_line(capsys)
    assert picture.read_bytes() == b"keep"


def test_pack_never_writes_over_a_file_of_its_image_folder(tmp_path, capsys):
    data = tmp_path / "data"
    synthetic.generate(data, n=4, size=16)
    own = data / "images" / "manifest.json"  # a file of the image folder, with the name pack writes
    own.write_text('{"from": "the dataset"}')
    before = _sha(own)
    rc = pack_main(["--images", str(data / "images"), "--masks", str(data / "masks"), "--num-classes", "6",
                    "--out", str(data / "images"), "--overwrite", "--workers", "1"])
    line = _one_line(capsys)
    assert rc == 2 and f"would write over {own}, a file of the image folder (--images {data / 'images'})" in line
    assert _sha(own) == before and not list((data / "images").glob("*.tar"))


def test_synth_into_a_file_is_refused(ckpt, capsys):
    before = _sha(ckpt)
    assert synth.main(["--out", str(ckpt), "--n", "2", "--overwrite"]) == 2
    assert f"--out {ckpt} is a file, not a folder" in _one_line(capsys)
    assert _sha(ckpt) == before


def test_an_output_that_is_another_output_is_refused(tmp_path):
    a = outputs.Output(tmp_path / "x.png", "the mask of a.jpg", f"--out {tmp_path}")
    b = outputs.Output(tmp_path / "x.png", "the overlay of x.jpg", f"--out {tmp_path}")
    with pytest.raises(UserError, match="is also"):
        outputs.check([], [a, b], overwrite=True)
