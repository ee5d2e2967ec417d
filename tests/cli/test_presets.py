"""Every --preset of `minilora train` is a valid set of TrainConfig settings, and its help says
what each one sets."""

from __future__ import annotations

import argparse

import pytest

from minilora.cli.main import build_parser
from minilora.cli.train import PRESETS
from minilora.core.errors import ConfigError
from minilora.training.config import TrainConfig


def _train_help() -> str:
    parser = build_parser(train_args=True)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"].format_help()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_parses_into_a_valid_config(name: str) -> None:
    config = TrainConfig.from_dict({"data": "train.jsonl", **PRESETS[name]})
    assert {k: getattr(config, k) for k in PRESETS[name]} == PRESETS[name]


def test_the_new_skill_preset_is_the_study_s_lora() -> None:
    preset = PRESETS["new-skill"]
    assert not preset.get("full")  # a LoRA, at a rank the study kept at or under 16
    assert 1 <= preset["lora_r"] <= 16


def test_a_bad_preset_value_would_be_refused() -> None:
    # The check above could fail: a preset with a value TrainConfig refuses raises.
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"data": "train.jsonl", **PRESETS["new-skill"], "lora_r": 0})


def test_the_help_names_every_preset() -> None:
    text = " ".join(_train_help().split())
    for name in PRESETS:
        assert name in text
