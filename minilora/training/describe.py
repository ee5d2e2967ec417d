"""What a path holds, read without a base model: a model, an adapter, a run or a checkpoint.

A training run's folder (train's ``out_dir``) is laid out as::

    config.json        the run's TrainConfig
    metrics.jsonl      one JSON record per logged step or eval
    adapter/           the final adapter (PEFT layout); ``model/`` instead for a --full run
    best/              the adapter (or model) of the lowest eval loss, with eval data
    checkpoints/step-N/ state.pt + trainable.safetensors + manifest.json, to resume from

The readers of that layout live here: `resolve_adapter_path` (a run folder means the adapter it
wrote) and `describe_path` (the `info` command).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from minilora.adapters.minimind import read_minimind
from minilora.adapters.peft import (
    BASE_LAYER_RE,
    FINGERPRINT_KEY,
    PREFIX,
    VERSION_KEY,
    WEIGHTS_NAME,
    read_peft,
)
from minilora.core.errors import AdapterError, ConfigError
from minilora.core.files import parse_json, read_json
from minilora.model.io import describe_model
from minilora.training.checkpoint import CHECKPOINTS, latest_checkpoint, read_state
from minilora.training.run_layout import RunLayout

RUN_CONFIG = RunLayout.CONFIG
RUN_LOG = RunLayout.METRICS
RUN_ADAPTER = RunLayout.ADAPTER
RUN_MODEL = RunLayout.MODEL  # a --full run's model folder
_CHECKPOINT_FILES = ("state.pt", "trainable.safetensors")


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a training run's folder (it holds the run's metrics.jsonl)."""
    return (Path(path) / RUN_LOG).is_file()


def is_checkpoint_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is one training checkpoint (``<run>/checkpoints/step-N``)."""
    return all((Path(path) / name).is_file() for name in _CHECKPOINT_FILES)


def resolve_adapter_path(path: str | os.PathLike[str]) -> Path:
    """The adapter a path names: a training run's folder means the adapter that run wrote;
    an adapter folder or a MiniMind .pth is itself.

    Args:
        path: an adapter folder, a MiniMind .pth, or a training run's folder.

    Returns:
        The adapter folder or file to load (not checked further: ``load_adapter`` reads it).

    Raises:
        AdapterError: the path is a checkpoint, a --full run (a model, not an adapter) or a run
            that has not written its adapter yet.
    """
    path = Path(path)
    if is_checkpoint_folder(path):
        run = path.parent.parent
        raise AdapterError(f"{path} is a training checkpoint, not an adapter: resume its run to "
                           f"finish it; the adapter a run writes at its end is {run / RUN_ADAPTER}")
    if not is_run_folder(path):
        return path
    if (path / RUN_ADAPTER).is_dir():
        return path / RUN_ADAPTER
    if (path / RUN_MODEL).is_dir():
        raise AdapterError(f"{path} is a full fine-tuning run: it wrote a model "
                           f"({path / RUN_MODEL}), not an adapter; load that as the base model")
    kept = latest_checkpoint(path / CHECKPOINTS)
    where = f" (its latest checkpoint: {kept})" if kept else ""
    raise AdapterError(f"{path} is a training run that has not written its adapter yet{where}: "
                       "resume it to finish it")


def describe_path(path: str | os.PathLike[str], model_config: str | None = None) -> dict[str, Any]:
    """What a path holds, for display: a model folder or .pth, an adapter folder or MiniMind
    .pth, a training run's folder or one of its checkpoints.

    Args:
        path: the file or folder.
        model_config: a bare MiniMind .pth model's config (as ``load_model``'s ``config``).

    Returns:
        An ordered dict of labels to values (``describe_model``, ``describe_adapter``, or the
        run's or checkpoint's settings and progress).

    Raises:
        FileNotFoundError: nothing at ``path``.
        MiniloraError: a file that cannot be read as what it looks like (the subclass says
            which: AdapterError, WeightsError, CheckpointError, ConfigError).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if is_checkpoint_folder(path):
        return describe_checkpoint(path)
    if is_run_folder(path) and (path / RUN_CONFIG).is_file():
        return describe_run(path)
    if (path / "adapter_config.json").exists() or _is_minimind_adapter(path):
        return describe_adapter(path)
    return describe_model(path, model_config)


def describe_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training checkpoint (``checkpoints/step-N``): where its run stands and how it was set.

    Raises:
        CheckpointError: state.pt is damaged, refused (a pickle needing code) or not minilora's.
    """
    path = Path(path)
    state = read_state(path)  # its manifest checked before anything is unpickled
    config = state["config"]
    run = path.parent.parent
    return {"checkpoint": str(path), "step": f"{state['step']} of {state.get('total_steps')}",
            "base": config.get("model"), "data": config.get("data"),
            "lr": config.get("lr"), "r": config.get("lora_r"),
            "fingerprint": state.get("fingerprint"),
            "resume": f"minilora train --resume --out {run}"}


def describe_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training run's folder: its settings, its progress, and the adapter it wrote.

    Raises:
        ConfigError: config.json is not a JSON object.
        AdapterError: the run's adapter is damaged.
    """
    path = Path(path)
    config = read_json(path / RUN_CONFIG, "a run's config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{path / RUN_CONFIG}: expected a JSON object of TrainConfig fields, "
                          f"got {type(config).__name__}")
    records = []
    text = (path / RUN_LOG).read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            records.append(parse_json(line))
        except ValueError:
            continue  # a line torn by a killed run, as train's resume skips it
    losses = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
              and isinstance(r.get("loss"), (int, float))]
    info: dict[str, Any] = {"run": str(path), "base": config.get("model"),
                            "data": config.get("data"), "lr": config.get("lr")}
    if losses:
        info["last step"] = losses[-1]["step"]
        info["last loss"] = round(losses[-1]["loss"], 4)
    kept = latest_checkpoint(path / CHECKPOINTS)
    info["checkpoint"] = str(kept) if kept else "none"
    adapter = path / RUN_ADAPTER
    if (adapter / "adapter_config.json").is_file():
        info.update({f"adapter {k}": v for k, v in describe_adapter(adapter).items()})
    return info


def describe_adapter(path: str | os.PathLike[str]) -> dict[str, object]:
    """What an adapter folder or MiniMind .pth holds, read without a base model.

    Returns:
        An ordered dict for display: format, r, alpha, scaling, targets, the adapted modules,
        the LoRA parameter count, the dtype, and the recorded base fingerprint and version.

    Raises:
        AdapterError: as ``load_adapter`` does for missing, damaged or hostile files.
    """
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_NAME:
        path = path.parent
    if path.is_dir():
        config, sd, metadata = read_peft(path)
        kind = "PEFT adapter folder"
    elif path.is_file():
        config, sd = read_minimind(path)
        metadata, kind = {}, "MiniMind LoRA .pth (scale 1)"
    else:
        raise AdapterError(f"no adapter at {path}")
    sd = {k: v for k, v in sd.items() if not BASE_LAYER_RE.fullmatch(k)}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    # the modules to save and the trainable token rows are no LoRA modules: their own rows
    extras = {k: sd.pop(k) for k in list(sd) if ".lora_" not in k}
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in sd})
    extra_rows: dict[str, object] = {}
    if config.modules_to_save:
        extra_rows["modules to save"] = config.modules_to_save
    if config.trainable_token_indices:
        extra_rows["trainable tokens"] = config.trainable_token_indices
    if extras:
        extra_rows["their parameters"] = sum(t.numel() for t in extras.values())
    return {
        "path": str(path),
        "format": kind,
        "r": config.r,
        "alpha": config.alpha,
        "scaling": config.scaling,
        "targets": config.targets,
        "modules": len(modules),
        "first modules": modules[:4],
        "lora parameters": sum(t.numel() for t in sd.values()),
        **extra_rows,
        "dtype": ", ".join(dtypes),
        "base fingerprint": metadata.get(FINGERPRINT_KEY, "none recorded"),
        "minilora version": metadata.get(VERSION_KEY, "-"),
    }


def _is_minimind_adapter(path: Path) -> bool:
    """A .pth of MiniMind LoRA keys (``<module>.lora.A.weight``) rather than a model."""
    if path.suffix != ".pth" or not path.is_file():  # a FIFO: describe_model refuses it
        return False
    sd = None
    # Mapped, not read, first: a model .pth of GBs is only looked at here (describe_model reads
    # it). The legacy (non-zip) format cannot be mapped and is read whole, as before.
    for mmap in (True, False):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # a hostile or broken file: describe_model reports it in one line
            continue
    return isinstance(sd, dict) and any(".lora.A." in k for k in sd)
