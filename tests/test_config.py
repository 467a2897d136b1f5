from pathlib import Path

import pytest
import yaml

from seg_dist.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict

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
        ("train.sync_bn=1", "expected one of auto, on, off"),
        ("train.amp=fp8", "expected one of off, bf16, fp16, auto"),
        ("data.mean=[1,2]", "expected 3 values"),
        ("train.batch_size=0", "must be at least 1"),
        ("train", "expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
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
    assert isinstance(plain["data"]["mean"], list)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    assert isinstance(load_config(REPO / "configs" / name), Config)


def test_model_name_is_checked_against_the_model_table():
    with pytest.raises(ConfigError, match=r"model.name='resnet_fcn': expected one of unet, smp_unet"):
        load_config(None, ["model.name=resnet_fcn"])


def test_retired_key_is_a_warning_not_an_error(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  shuffle_buffer: 1000\n  workers: 3\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(old)
    assert cfg.data.workers == 3
    assert "data.shuffle_buffer is ignored: every epoch is a fresh permutation" in caplog.text
    with pytest.raises(ConfigError, match=r"did you mean data\.workers"):
        load_config(None, ["data.wokers=2"])
