"""Checks on what enters minilora: numbers finite and in range, fields of the type they claim.
One place, so that a config field, a command-line flag and a file read all give the same kind of
message. Pure Python (a config is checked without torch); the checks on tensors and devices are
in tensor_checks.py, and are still found here by their old names.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from typing import Any

from minilora.core.errors import ConfigError, MiniloraError

# A trained LoRA (or fully fine-tuned) weight this large is not learning, it has diverged (an
# lr far too high): LoRA weights are ~1e-2 and base weights rarely above ~1e2.
MAX_TRAINED_WEIGHT = 1e4


def number(name: str, value: object, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, error: type[MiniloraError] | None = None) -> float:
    """``value`` as a float if it is a finite number (not a bool) in [low, high].

    Args:
        name: how the user calls it (``--temperature``, ``LoraConfig.alpha``), for the message.
        low, high: the range; ``low_open`` makes the lower bound exclusive.
        error: the error type (ConfigError by default).

    Raises:
        error: not a number, not finite, or out of range.
    """
    error = error or ConfigError
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}: expected a number, got {value!r}")
    value = float(value) if not isinstance(value, float) else value
    if not math.isfinite(value):
        raise error(f"{name}: expected a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise error(f"{name}: expected a number {' and '.join(b for b in (lo, hi) if b)}, "
                    f"got {value:g}")
    return value


def type_problems(obj: Any, prefix: str) -> list[str]:
    """Fields of a dataclass instance whose value is not of the field's declared type.

    An int is accepted for a float field (and converted in place); a bool is never taken for an
    int or a float; a float must be finite. Returns one message per bad field, naming it.
    """
    return [f"{prefix}{name}: {what}" for name, what in field_type_problems(obj).items()]


def field_type_problems(obj: Any) -> dict[str, str]:
    """``type_problems`` by field: field name -> what is wrong (``expected int, got 'x'``)."""
    hints = typing.get_type_hints(type(obj))
    problems = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        ok, converted = _matches(value, hints[f.name])
        if not ok:
            problems[f.name] = f"expected {_describe(hints[f.name])}, got {value!r}"
        elif isinstance(converted, float) and not math.isfinite(converted):
            problems[f.name] = f"expected a finite number, got {converted}"
        else:
            setattr(obj, f.name, converted)
    return problems


def _matches(value: object, hint: Any) -> tuple[bool, object]:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return True, value
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            if all(_matches(v, item)[0] for v in value):
                return True, value
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        elif option in (str, bool) and type(value) is option:
            return True, value
        elif option is Any:
            return True, value
        elif origin not in (None, list) and isinstance(value, origin):
            return True, value  # dict[str, float], tuple[int, ...]: the container is checked
        elif (origin is None and isinstance(option, type)
              and option not in (int, float, str, bool) and isinstance(value, option)):
            return True, value  # dict, or a class of the field's own
    return False, value


def _describe(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if o is type(None) else str(o) if typing.get_origin(o)
                       else o.__name__ for o in options)
