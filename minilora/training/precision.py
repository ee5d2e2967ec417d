"""Which autocast dtype a run computes in: "auto" resolved from the hardware, with the reason in
words for the run's opening block.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minilora.core.errors import ConfigError


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """The dtype ``name`` ("auto" included) means on ``device``, and the precision in words.

    Returns:
        (``"float32"``, ``"bfloat16"`` or ``"float16"``; e.g. ``"bfloat16 autocast (this CPU
        has avx512_bf16/AMX)"``).
    """
    amp = autocast_dtype(name, device)
    resolved = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[amp]
    if name != "auto":
        why = "as asked"
    elif device.type == "cpu":
        why = ("this CPU has avx512_bf16/AMX" if amp is not None
               else "this CPU has no bfloat16 units, emulated bf16 would be slower")
    else:
        why = f"{device.type} {'computes' if amp is not None else 'lacks'} bfloat16 natively"
    words = f"{resolved} autocast ({why})" if amp is not None else f"float32 ({why})"
    return resolved, words


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CUDA sm80+, CPUs with AVX512-BF16/AMX).

    Elsewhere bf16 is emulated: slower than float32 and less precise, so "auto" picks float32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return "AMX" in capability.upper()


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``TrainConfig.amp_dtype`` on ``device``; None means float32.

    Raises:
        ConfigError: float16 off CUDA (its GradScaler needs CUDA), bfloat16 on a device
            without bf16 autocast.
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "float16" and device.type != "cuda":
        raise ConfigError("{amp_dtype} float16 needs CUDA (for its GradScaler); on CPU use "
                          "bfloat16 or float32", fields={"amp_dtype": "amp_dtype"})
    if name == "bfloat16" and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{{amp_dtype}} bfloat16: no autocast on {device.type}; use float32",
                          fields={"amp_dtype": "amp_dtype"})
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
