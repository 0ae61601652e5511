"""Config loading: numbers in any YAML spelling, value bounds naming the key, --set parsing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from conftest import REPO

from mixofshow.train.config import load_train_config
from mixofshow.utils.config import (
    Bounds,
    ConfigError,
    apply_overrides,
    check_bounds,
    from_dict,
    load_yaml,
    parse_overrides,
    parse_yaml_value,
)

EXAMPLE = REPO / "configs" / "example.yaml"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-4", 1e-4), ("1E5", 1e5), ("-2.5e3", -2500.0), ("1.0e-4", 1e-4), (".5e-1", 0.05), ("+3e0", 3.0),
     ("1_000e-3", 1.0), ("0.5", 0.5), ("1.0e-4", 1e-4)],
)
def test_yaml_12_float_spellings_are_floats(text, value):
    parsed = parse_yaml_value(text, "x")
    assert isinstance(parsed, float) and parsed == pytest.approx(value)


@pytest.mark.parametrize("text", ["e5", "1e", "1e-4x", "abc", "0x1e4"])
def test_non_numbers_stay_what_yaml_says(text):
    assert not isinstance(parse_yaml_value(text, "x"), float)


def test_1e4_in_a_file_and_in_set_reaches_the_config(tmp_path):
    text = EXAMPLE.read_text().replace("lr_unet: 1.0e-4", "lr_unet: 1e-4")
    assert "lr_unet: 1e-4" in text
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.replace("../datasets", str(REPO / "datasets")))
    assert load_yaml(cfg)["optimizer"]["lr_unet"] == 1e-4
    config = load_train_config(cfg, parse_overrides(["optimizer.lr_text_encoder=2e-5", "optimizer.params={eps: 1e-6}"]))
    assert config.optimizer.lr_unet == 1e-4 and config.optimizer.lr_text_encoder == 2e-5
    assert config.optimizer.params == {"eps": 1e-6}  # Any-typed values too: the loader reads the float


@dataclass
class _Small:
    lr: float = 0.1
    steps: int = 1
    scales: list[float] = field(default_factory=list)


def test_numeric_strings_are_accepted_where_numbers_are_expected():
    cfg = from_dict(_Small, {"lr": "1e-4", "steps": "1e3", "scales": ["0.5", 1]}, "f.yaml")
    assert (cfg.lr, cfg.steps, cfg.scales) == (1e-4, 1000, [0.5, 1.0])
    with pytest.raises(ConfigError, match=r"f\.yaml: lr: expected a number, got 'fast'"):
        from_dict(_Small, {"lr": "fast"}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml: steps: expected an integer, got '2\.5'"):
        from_dict(_Small, {"steps": "2.5"}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml: steps: expected an integer, got 2\.0"):
        from_dict(_Small, {"steps": 2.0}, "f.yaml")


def test_bounds_messages_name_the_key():
    rules = {"lr": Bounds(ge=0), "steps": Bounds(ge=1), "scales": Bounds(gt=0, le=1)}
    check_bounds(_Small(lr=0.0, steps=1, scales=[1.0]), rules)
    cases = [
        (_Small(lr=-1.0), "lr: expected a number >= 0, got -1"),
        (_Small(lr=math.inf), "lr: expected a number >= 0, got inf"),
        (_Small(lr=math.nan), "lr: expected a number >= 0, got nan"),
        (_Small(steps=0), "steps: expected an integer >= 1, got 0"),
        (_Small(scales=[0.5, 0.0]), "scales: expected a number > 0 and <= 1, got 0"),
    ]
    for obj, message in cases:
        with pytest.raises(ValueError) as info:
            check_bounds(obj, rules)
        assert str(info.value) == message
    with pytest.raises(ValueError, match="a multiple of 8, got 100"):
        check_bounds(_Small(steps=100), {"steps": Bounds(ge=8, multiple_of=8)})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optimizer.lr_unet": -1}, "optimizer.lr_unet: expected a number >= 0, got -1"),
        ({"optimizer.lr_text_encoder": float("nan")}, "optimizer.lr_text_encoder: expected a number >= 0, got nan"),
        ({"optimizer.lr_embedding": -1e-3}, "optimizer.lr_embedding: expected a number >= 0, got -0.001"),
        ({"train.max_steps": 0}, "train.max_steps: expected an integer >= 1, got 0"),
        ({"train.batch_size": 0}, "train.batch_size: expected an integer >= 1, got 0"),
        ({"train.gradient_accumulation_steps": -2}, "train.gradient_accumulation_steps: expected an integer >= 1, got -2"),
        ({"lora.rank": 0}, "lora.rank: expected an integer >= 1, got 0"),
        ({"lora.rank_dropout": 1.0}, "lora.rank_dropout: expected a number >= 0 and < 1, got 1"),
        ({"data.resolution": 100}, "data.resolution: expected an integer >= 8, a multiple of 8, got 100"),
        ({"data.flip_p": 1.5}, "data.flip_p: expected a number >= 0 and <= 1, got 1.5"),
        ({"train.max_grad_norm": 0}, "train.max_grad_norm: expected a number > 0, got 0"),
        ({"validation.lora_scales": [0, float("inf")]}, "validation.lora_scales: expected a number, got inf"),
    ],
)
def test_train_config_values_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(EXAMPLE, override)
    assert str(info.value) == f"{EXAMPLE}: {message}"


def test_shipped_example_configs_load():
    for name in ("example", "cat", "cactus"):
        config = load_train_config(REPO / "configs" / f"{name}.yaml")
        assert config.optimizer.lr_unet == 1e-4


def test_overrides_parse_and_apply():
    assert parse_overrides(["lora.rank=8", "name=x=y", "validation.prompts=[a, b]"]) == {
        "lora.rank": 8, "name": "x=y", "validation.prompts": ["a", "b"]}
    for bad in ("lora.rank", "=1", "lora..rank=1", ".rank=1"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_overrides([bad])
    data = {"name": "robot", "lora": None}
    apply_overrides(data, {"lora.rank": 8, "train.max_steps": 3}, "f.yaml")
    assert data == {"name": "robot", "lora": {"rank": 8}, "train": {"max_steps": 3}}
    with pytest.raises(ConfigError, match=r"f\.yaml: cannot set 'name\.foo': 'name' is a value \('robot'\)"):
        apply_overrides(data, {"name.foo": 1}, "f.yaml")
    with pytest.raises(ConfigError, match=r"cannot set 'lora\.rank\.x': 'lora\.rank' is a value"):
        apply_overrides(data, {"lora.rank.x": 1}, "f.yaml")
