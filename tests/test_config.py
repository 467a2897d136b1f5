import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from seg_dist.config import CHECKS, Config, ConfigError, dump_yaml, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.batch_size=4", "optim.lr=3e-4", "data.augment.scale=[0.7,1.3]"])
    assert cfg.train.batch_size == 4
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.augment.scale == (0.7, 1.3)
    # An int where a float is expected is widened; a number where a string is expected is kept.
    cfg = load_config(None, ["optim.lr=1", "run.dir=2024", "train.amp=off"])
    assert isinstance(cfg.optim.lr, float) and cfg.run.dir == "2024"
    assert cfg.train.amp == "off"  # YAML 1.1 reads a bare `off` as false


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=3", "did you mean train.batch_size"),
        ("trian.epochs=3", "did you mean train"),
        ("train.batch_size=abc", "train.batch_size='abc': expected an integer"),
        # Types in words, not Python's annotations.
        ("train.bn_group=abc", "train.bn_group='abc': expected an integer or null (unset)"),
        ("data.image_size=[1,2,3]", "data.image_size=[1, 2, 3]: expected an integer or [integer, integer]"),
        ("data.augment.scale=[1]", "expected 2 values, [number, number]"),
        ("data.mean=3", "data.mean=3: expected a list of numbers or null (unset)"),
        ("train.sync_bn=1", "expected one of auto, on, off"),
        ("train.amp=fp8", "expected one of off, bf16, fp16, auto"),
        ("data.mean=[1,2]", "set both"),
        ("train.batch_size=0", "must be at least 1"),
        ("train", "expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 16\n")
    with pytest.raises(ConfigError, match=r"model.widht.*did you mean model.width"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 2\nmodel:\n  width: 8\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.depth=3"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.width, cfg.model.depth) == (3, 2, 8, 3)


def test_round_trip_through_plain_data():
    cfg = load_config(None, ["data.num_classes=5", "data.class_names=[a,b,c,d,e]"])
    plain = to_dict(cfg)
    assert from_dict(plain) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert isinstance(plain["optim"]["betas"], list)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    assert isinstance(load_config(REPO / "configs" / name), Config)


def test_model_name_is_checked_against_the_model_table():
    with pytest.raises(ConfigError, match=r"model.name='resnet_fcn': expected one of unet, smp_unet"):
        load_config(None, ["model.name=resnet_fcn"])


def test_a_key_no_version_declares_is_an_error(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  cache_dir: /tmp/x\n  workers: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.cache_dir'"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"did you mean data\.workers"):
        load_config(None, ["data.wokers=2"])


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        keys |= _leaf_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else {f"{prefix}{f.name}"}
    return keys


def test_every_config_key_has_a_range_check():
    assert sorted(key for key, _, _ in CHECKS) == sorted(_leaf_keys(Config))
    defaults = load_config(None)
    for key, ok, valid in CHECKS:  # the defaults themselves are in range
        node = defaults
        for name in key.split("."):
            node = getattr(node, name)
        assert ok(node), f"default {key}={node!r} is outside its own range: {valid}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=0"], "train.epochs=0: must be at least 1"),
        (["train.epochs=-3"], "train.epochs=-3: must be at least 1"),
        (["train.max_nonfinite=0"], "train.max_nonfinite=0: must be at least 1"),
        (["loss.ce_weight=0", "loss.dice_weight=0"], "at least one must be greater than 0"),
        (["loss.dice_weight=-0.5"], "loss.dice_weight=-0.5: must be at least 0"),
        (["optim.lr=0"], "optim.lr=0.0: must be greater than 0"),
        (["loss.label_smoothing=1"], "loss.label_smoothing=1.0: must be in [0, 1)"),
        (["optim.lr=-1e-3"], "optim.lr=-0.001: must be greater than 0"),
        (["data.workers=-1"], "data.workers=-1: must be at least 0"),
        (["logging.log_every=0"], "logging.log_every=0: must be at least 1"),
        (["train.max_steps=-5"], "train.max_steps=-5: 0 (no limit) or at least 1"),
        (["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1: must be at least 0"),
        (["data.prefetch_factor=0"], "data.prefetch_factor=0: must be at least 1"),
        (["train.val_every=0"], "train.val_every='0': expected auto, N (epochs), 'N epochs', 'N steps' or"),
        (["schedule.warmup_iters=-1"], "schedule.warmup_iters=-1: must be at least 0"),
        (["schedule.plateau_factor=1.5"], "schedule.plateau_factor=1.5: must be in (0, 1)"),
        (["schedule.min_lr=1"], "schedule.min_lr=1.0: must be at most optim.lr"),
        (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]: each beta must be in [0, 1)"),
        (["data.augment.hflip=1.5"], "data.augment.hflip=1.5: a probability, must be in [0, 1]"),
        (["data.augment.rot90=1", "data.image_size=[16,24]"], "data.augment.rot90=1.0 turns square crops only"),
        (["data.augment.affine=-0.1"], "data.augment.affine=-0.1: a probability"),
        (["data.augment.scale=[1.2,0.8]"], "data.augment.scale=[1.2, 0.8]: [low, high] with 0 < low <= high"),
        (["data.augment.scale=[0,1]"], "data.augment.scale=[0.0, 1.0]: [low, high] with 0 < low <= high"),
        (["data.std=[0.2,0,0.2]"],
         "data.std=[0.2, 0.0, 0.2]: unset (from the manifest) or one number greater than 0 per channel"),
        (["train.dist_timeout_minutes=0"], "train.dist_timeout_minutes=0.0: must be greater than 0"),
        (["train.ema_decay=1"], "train.ema_decay=1.0: 0 (off) or a decay in (0, 1)"),
        (["data.num_classes=3", "data.class_names=[a,b]"], "data.class_names has 2 names but data.num_classes=3"),
        (["data.image_size=8"], "data.image_size=8: the U-Net needs each side at least 2**model.depth=16"),
    ],
)
def test_out_of_range_values_fail_at_load_with_the_range(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("module", ["seg_dist.config", "seg_dist.models"])
def test_config_and_the_model_table_import_without_a_circle(module):
    # Each imported first on its own: config needs the model table, the models need config only for typing.
    code = f"import sys, {module}; print('seg_dist.config' in sys.modules, 'seg_dist.models' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["True", "True"] if module == "seg_dist.config" else ["False", "True"])
