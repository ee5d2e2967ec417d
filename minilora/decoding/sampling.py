"""Sampling settings: one dataclass, one validator, and a model folder's own defaults.

A model folder (or an adapter folder) may hold ``generation_config.json``, as transformers writes
it: the sampling its authors recommend. Like transformers' ``generate`` and vLLM, minilora uses
those values for every setting a user leaves out; a setting given always wins. Only the settings
that shape the next-token distribution are read (``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty``, and ``do_sample``: false means greedy, as in transformers); lengths and
special tokens stay the caller's.

Torch-free: the command line reads these before it loads a model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from minilora.core.errors import ConfigError
from minilora.core.files import read_json

GENERATION_CONFIG = "generation_config.json"
# generation_config.json is a few hundred bytes; a larger one is not one.
MAX_GENERATION_CONFIG = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits (transformers' order: repetition penalty,
    temperature, top-k, top-p, min-p)."""

    temperature: float = 0.0  # 0: the most likely token (greedy); > 0: softmax(logits / T)
    top_k: int = 0  # sample among the k most likely tokens only; 0: all
    top_p: float = 1.0  # the smallest set of tokens whose probability reaches top_p; 1: all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's; 0: off
    repetition_penalty: float = 1.0  # a seen token's logit divided by it (x if < 0); 1: off

    def __post_init__(self) -> None:
        problems = sampling_problems(**self.as_kwargs())
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def resolve(cls, given: Mapping[str, Any], *defaults: Mapping[str, Any]
                ) -> SamplingParams:
        """The settings given (None: left out), else the first of ``defaults`` that names the
        setting (a folder's ``generation_defaults``), else this class's own default.

        Raises:
            ConfigError: a setting out of range (every one named, in one message).
        """
        chosen: dict[str, Any] = {}
        for f in fields(cls):
            for source in (given, *defaults):
                if source.get(f.name) is not None:
                    chosen[f.name] = source[f.name]
                    break
        return cls(**chosen)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of ``generate`` / ``stream_generate`` (this class's
        fields only: a subclass, such as the server's per-request settings, adds others)."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingParams)}

    def describe(self) -> str:
        """The settings in words: ``greedy`` or ``temperature 0.7, top_p 0.9, ...``."""
        if self.temperature == 0:
            words = ["greedy"]
        else:
            defaults = SamplingParams()
            words = [f"{f.name} {getattr(self, f.name):g}" for f in fields(SamplingParams)
                     if f.name == "temperature"
                     or getattr(self, f.name) != getattr(defaults, f.name)]
        if self.temperature == 0 and self.repetition_penalty != 1.0:
            words.append(f"repetition_penalty {self.repetition_penalty:g}")
        return ", ".join(words)


def sampling_problems(temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0,
                      min_p: Any = 0.0, repetition_penalty: Any = 1.0) -> list[str]:
    """What is wrong with these settings, one message per setting (empty: all fine). The one
    check every reader of sampling settings uses (flags, files, the library's arguments)."""
    checks = {
        "temperature": (temperature, 0.0, False, None),
        "top_p": (top_p, 0.0, True, 1.0),
        "min_p": (min_p, 0.0, False, 1.0),
        "repetition_penalty": (repetition_penalty, 0.0, True, None),
    }
    problems = []
    for name, (value, low, low_open, high) in checks.items():
        problem = _number_problem(value, low, low_open, high)
        if problem:
            problems.append(f"{name}: {problem}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        problems.append(f"top_k: expected an integer >= 0, got {top_k!r}")
    return problems


def _number_problem(value: Any, low: float, low_open: bool, high: float | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {value!r}"
    if not math.isfinite(value):
        return f"expected a finite number, got {value}"
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f" and <= {high:g}"
        return f"expected a number {lo}{hi}, got {value:g}"
    return None


@dataclass(frozen=True)
class GenerationConfig:
    """What a folder's ``generation_config.json`` names: the sampling settings by SamplingParams
    field (as ``generation_defaults`` returns them) and the answer length, if it names one."""

    sampling: dict[str, Any]
    max_new_tokens: int | None = None


def generation_defaults(folder: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The sampling settings a model or adapter folder's ``generation_config.json`` names.

    Args:
        folder: a model or adapter folder (a file, or None: no defaults).

    Returns:
        The settings the file names, by SamplingParams field (``do_sample: false`` gives
        ``temperature: 0``; ``do_sample: true`` without a temperature gives transformers'
        temperature 1; ``top_k`` <= 0 is off, as in vLLM); {} when there is no such file.

    Raises:
        ConfigError: the file is not a JSON object, or names a setting out of range (the file
            and the field named).
    """
    return read_generation_config(folder).sampling


def read_generation_config(folder: str | os.PathLike[str] | None) -> GenerationConfig:
    """A model or adapter folder's ``generation_config.json``, read and checked: the one reader
    of that file (``generate``, ``chat`` and ``serve`` all use it).

    Args:
        folder: a model or adapter folder (a file, or None: nothing named).

    Returns:
        The sampling settings (as ``generation_defaults``) and ``max_new_tokens``; empty when
        there is no such file.

    Raises:
        ConfigError: the file is not a JSON object, or names a setting out of range (the file
            and the field named).
    """
    if folder is None or not Path(folder).is_dir():
        return GenerationConfig({})
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationConfig({})
    try:
        data = read_json(path, "a generation_config.json", MAX_GENERATION_CONFIG)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(data), "a number")
        raise ConfigError(f"{path}: {kind}; expected a JSON object such as "
                          '{"temperature": 0.7, "top_p": 0.9}')
    names = {f.name for f in fields(SamplingParams)}
    found = {k: v for k, v in data.items() if k in names and v is not None}
    if isinstance(found.get("top_k"), int) and not isinstance(found["top_k"], bool):
        found["top_k"] = max(found["top_k"], 0)
    do_sample = data.get("do_sample")
    if do_sample is False:
        found["temperature"] = 0.0
    elif do_sample is True and "temperature" not in found:
        found["temperature"] = 1.0
    problems = sampling_problems(**found)
    length = data.get("max_new_tokens")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 1):
        problems.append(f"max_new_tokens: expected an integer >= 1, got {length!r}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return GenerationConfig(found, length)


def generation_config_text(params: SamplingParams) -> str:
    """A generation_config.json holding these settings (for a folder that should carry them)."""
    body: dict[str, Any] = {"do_sample": params.temperature > 0, **params.as_kwargs()}
    return json.dumps(body, indent=2) + "\n"
