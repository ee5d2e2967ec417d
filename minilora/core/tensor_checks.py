"""Checks on tensors and devices: weights of a float dtype with finite values, a device this
machine has. The pure-Python checks (numbers, field types) are in checks.py.
"""

from __future__ import annotations

import sys

import torch

from minilora.core.errors import ConfigError, MiniloraError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """The device ``name`` means here ("auto": cuda:LOCAL_RANK with CUDA, else cpu).

    Raises:
        ConfigError: an unknown device, one this machine does not have (no CUDA, an index
            past the last GPU), or the meta device (which holds no data).
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
    if device.type == "meta":  # shapes without data: nothing can be computed or saved there
        raise ConfigError(f'device {name!r}: the meta device holds no data, so a model cannot '
                          'run there; use "cpu", "cuda" or "auto"')
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: CUDA is not available on this machine; use "
                              '"cpu" or "auto"')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif device.type != "cpu":
        checks = [getattr(m, "is_available", None) for m in (
            getattr(torch, device.type, None), getattr(torch.backends, device.type, None))]
        if not any(check() for check in checks if callable(check)):
            raise ConfigError(f"device {name}: not available on this machine")
    return device


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (a parameter FSDP sharded across processes). Checked without
    importing torch.distributed.tensor (1.5 s): nothing is a DTensor before that is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


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
