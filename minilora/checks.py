"""Checks on what enters minilora: numbers finite and in range, fields of the type they claim,
tensors of a float dtype with finite values. One place, so that a config field, a command-line
flag and a file read all give the same kind of message.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from typing import Any

import torch

from minilora.errors import ConfigError, MiniloraError

# A trained LoRA (or fully fine-tuned) weight this large is not learning, it has diverged (an
# lr far too high): LoRA weights are ~1e-2 and base weights rarely above ~1e2.
MAX_TRAINED_WEIGHT = 1e4
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """The device ``name`` means here ("auto": cuda:LOCAL_RANK with CUDA, else cpu).

    Raises:
        ConfigError: an unknown device, or one this machine does not have (no CUDA, an index
            past the last GPU).
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f'device {name!r}: unknown; expected "auto", "cpu", "cuda" or '
                          '"cuda:N"') from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine; use "
                              '"cpu" or "auto"')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        checks = [getattr(m, "is_available", None) for m in (
            getattr(torch, device.type, None), getattr(torch.backends, device.type, None))]
        if not any(check() for check in checks if callable(check)):
            raise ConfigError(f"device {name}: not available on this machine")
    return device


def type_problems(obj: Any, prefix: str) -> list[str]:
    """Fields of a dataclass instance whose value is not of the field's declared type.

    An int is accepted for a float field (and converted in place); a bool is never taken for an
    int or a float; a float must be finite. Returns one message per bad field, naming it.
    """
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        ok, converted = _matches(value, hints[f.name])
        if not ok:
            problems.append(f"{prefix}{f.name}: expected {_describe(hints[f.name])}, "
                            f"got {value!r}")
        elif isinstance(converted, float) and not math.isfinite(converted):
            problems.append(f"{prefix}{f.name}: expected a finite number, got {converted}")
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


def tensor_problems(tensors: dict[str, torch.Tensor], *, limit: int = 5) -> list[str]:
    """Tensors that are not weights: not a float dtype (int8, bool, complex ...), or holding NaN
    or infinite values. Returns one message per kind, naming up to ``limit`` tensors."""
    wrong = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items()
             if t.dtype not in FLOAT_DTYPES]
    bad = [k for k, t in tensors.items() if t.dtype in FLOAT_DTYPES and not _all_finite(t)]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of a dtype that is not float32, float16, "
                        f"bfloat16 or float64: {_names(wrong, limit)}")
    if bad:
        problems.append(f"{len(bad)} tensor(s) holding NaN or infinite values: "
                        f"{_names(bad, limit)}")
    return problems


def _all_finite(t: torch.Tensor) -> bool:
    # The sum is non-finite when any element is, and allocates nothing of t's size (a loader
    # checks each tensor as it arrives, so a mask as large as the tensor would raise its peak);
    # only a sum that overflowed from finite values needs the element-wise look.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _names(names: list[str], limit: int) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_written(tensors: dict[str, torch.Tensor], where: object,
                  error: type[MiniloraError]) -> None:
    """Refuse to write tensors with NaN or infinite values (or of a dtype no weight has).

    Raises:
        error: naming the output and the tensors.
    """
    problems = tensor_problems(tensors)
    if problems:
        raise error(f"refusing to write {where}: " + "; ".join(problems))
