"""The typed config: YAML and `a.b=value` overrides are checked against the dataclasses, and a
typo or a wrong type fails naming the key and the valid choices."""
from pathlib import Path

import pytest
import yaml

from cafe.config import ConfigError, ExperimentConfig, load_config, to_flat_dict, to_yaml

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo_path():
    return DEMO if DEMO.is_file() else None


def leaves(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_demo_config_loads_and_every_key_in_it_takes_effect():
    config = load_config(demo_path())
    assert isinstance(config, ExperimentConfig)
    flat = to_flat_dict(config)
    raw = yaml.safe_load(DEMO.read_text()) if DEMO.is_file() else {}
    for key, value in leaves(raw).items():
        assert flat[key] == value, key
        assert type(flat[key]) is type(value) or isinstance(value, int) and type(flat[key]) is float, key


def test_yaml_round_trip(tmp_path):
    config = load_config(demo_path(), ["loss.contrastive=sigmoid", "eval.recall_ks=[1, 3]"])
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config


def test_overrides_change_values_and_coerce_ints_to_floats():
    base = load_config(demo_path())
    config = load_config(demo_path(), [
        "loss.con_weight=2", "train.batch_size=3", "loss.contrastive=sigmoid",
        "loss.learnable_temperature=true", "data.scenes.seed=7", "name=other", "train.zero_stage=3",
    ])
    assert config.loss.con_weight == 2.0 and type(config.loss.con_weight) is float
    assert config.train.batch_size == 3 and type(config.train.batch_size) is int
    assert config.loss.contrastive == "sigmoid"
    assert config.loss.learnable_temperature is True
    assert config.data.scenes.seed == 7
    assert config.name == "other"
    assert config.train.zero_stage == 3
    # everything not overridden is unchanged
    changed = {k for k, v in to_flat_dict(config).items() if to_flat_dict(base)[k] != v}
    assert changed <= {"loss.con_weight", "train.batch_size", "loss.contrastive", "loss.learnable_temperature",
                       "data.scenes.seed", "name", "train.zero_stage"}
    assert {"loss.con_weight", "loss.contrastive", "name"} <= changed


def test_unknown_key_names_the_key_and_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.con_wieght=1"])
    message = str(err.value)
    assert "'loss.con_wieght'" in message
    assert "con_weight" in message and "temperature" in message and "compute_language_loss" in message
    with pytest.raises(ConfigError, match="'data.scenes.colour'"):
        load_config(None, ["data.scenes.colour=red"])
    with pytest.raises(ConfigError, match="'trian'.*'train'"):
        load_config(None, ["trian.lr=1"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  con_weight: 1.0\n  temprature: 0.1\n")
    with pytest.raises(ConfigError, match="'loss.temprature'"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(path)


@pytest.mark.parametrize("override, choices", [
    ("loss.contrastive=triplet", ["infonce", "sigmoid"]),
    ("loss.emb_type=first", ["last", "mean"]),
    ("model.attn_implementation=flash_attention_2", ["sdpa", "eager"]),
    ("train.zero_stage=4", [0, 1, 2, 3]),
    ("train.zero_stage=true", [0, 1, 2, 3]),  # True == 1, but a bool is not a ZeRO stage
])
def test_literal_choices_are_listed(override, choices):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value)
    assert str(choices) in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=abc", "int"),
    ("train.batch_size=1.5", "int"),
    ("train.batch_size=true", "int"),  # bool is an int subclass in Python; not here
    ("loss.con_weight=true", "float"),
    ("loss.con_weight=high", "float"),
    ("loss.compute_language_loss=1", "bool"),
    ("model.checkpoint=[a, b]", "str"),
    ("eval.recall_ks=5", "list"),
    ("eval.recall_ks=[1, true]", "int"),
    ("loss=3", "mapping"),
])
def test_wrong_types_are_rejected(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value)
    assert expected in str(err.value)


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["loss.con_weight"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["name=x", "name.sub=1"])


def test_flat_dict_has_dotted_leaf_keys():
    config = load_config(None, ["data.scenes.image_size=32"])
    flat = to_flat_dict(config)
    assert flat["data.scenes.image_size"] == 32
    assert flat["loss.temperature"] == config.loss.temperature
    assert flat["eval.recall_ks"] == [1, 5, 10]
    assert flat["name"] == config.name
    assert not {"model", "data", "data.scenes", "loss", "train", "eval", "tracking"} & set(flat)  # no sections
    assert all(not isinstance(value, dict) for value in flat.values())
    # every leaf of the YAML view appears once, under its dotted path
    assert set(flat) == set(leaves(yaml.safe_load(to_yaml(config))))


def test_gradcache_chunk_defaults_to_one_forward_and_takes_an_int():
    assert load_config().train.gradcache_chunk == 0
    assert load_config(None, ["train.gradcache_chunk=2"]).train.gradcache_chunk == 2
    with pytest.raises(ConfigError, match="train.gradcache_chunk"):
        load_config(None, ["train.gradcache_chunk=half"])
