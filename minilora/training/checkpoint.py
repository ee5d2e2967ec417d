"""The checkpoint format: save, verify, load and find a run's checkpoints.

A checkpoint is ``checkpoints/step-NNNNNNNN/`` holding ``trainable.safetensors`` (the trainable
weights), ``state.pt`` (optimizer, scaler, data position, counters, config; plain tensors and
containers, read with ``weights_only=True``) and ``manifest.json`` (the SHA-256 of each, written
last). A resume refuses a checkpoint of another run (config, processes, data, base) by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from minilora.core.checks import MAX_TRAINED_WEIGHT
from minilora.core.errors import CheckpointError, TrainError
from minilora.core.files import (
    atomic_write,
    read_bounded,
    read_json,
    replace_folder,
    torch_load_reason,
)
from minilora.core.tensor_checks import is_sharded
from minilora.lora.fingerprint import base_fingerprint
from minilora.training.config import RESUMABLE_CHANGES, TrainConfig, field_defaults, renamed_keys
from minilora.training.datasets import BatchPlan
from minilora.training.fsdp import (
    load_whole_,
    shard_optimizer_state,
    whole,
    whole_optimizer_state,
)
from minilora.training.run_layout import RunLayout

CHECKPOINTS = RunLayout.CHECKPOINTS  # folder under out_dir holding step-NNNNNNNN checkpoints
MANIFEST = "manifest.json"  # in a checkpoint: the SHA-256 of each of its files, written last
FORMAT = 1  # version of the checkpoint layout
_MAX_CHECKPOINT_FILE = 1 << 40  # read whole: a LoRA checkpoint is MBs; a --full one can be GBs


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves beside the weights and optimizer."""

    step: int = 0  # optimizer steps done
    skipped: int = 0  # non-finite steps skipped
    bad_in_a_row: int = 0
    best_eval_loss: float | None = None


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_finite(tensors: dict[str, torch.Tensor], kept: Path | None = None) -> None:
    """Refuse to save NaN / inf weights, and weights that diverged (an lr far too high keeps the
    loss finite while the weights grow without bound: the adapter then answers nothing).

    Args:
        kept: the checkpoint folder whose earlier checkpoints stay untouched, named in the error.
    """
    where = f"the checkpoints in {kept} are kept" if kept else "nothing was written"
    bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainError(f"refusing to save non-finite (NaN or inf) weights in {bad[:3]}; "
                         f"{where}: lower the learning rate, or train in fp32 "
                         "(--amp-dtype float32)")
    sizes = {n: float(t.detach().abs().max()) for n, t in tensors.items() if t.numel()}
    huge = sorted((n for n, v in sizes.items() if v > MAX_TRAINED_WEIGHT), key=sizes.__getitem__,
                  reverse=True)
    if huge:
        raise TrainError(f"refusing to save weights that diverged (lower the learning rate; "
                         f"{where}): largest magnitude {sizes[huge[0]]:.3g} > "
                         f"{MAX_TRAINED_WEIGHT:g} in {huge[:3]}")


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Any, config: TrainConfig, plan: BatchPlan, run: RunState,
                    rank: int = 0) -> Path | None:
    """Write ``folder/step-NNNNNNNN/`` and drop the older checkpoints; rank 0 only.

    ``trainable.safetensors`` holds the trainable weights; ``state.pt`` the optimizer, scaler,
    data position, counters and config as plain tensors, numbers, strings, lists and dicts (read
    back with ``torch.load(weights_only=True)``). No RNG state: nothing a run draws depends on
    it (dropout is reseeded per step, the data order is a function of seed and epoch). Both are
    written into a temporary folder, fsynced, and the folder renamed into place: a checkpoint
    folder is complete or absent.

    Under FSDP every rank calls it: the shards are gathered and rank 0 writes whole tensors,
    the layout one process writes, which any number of processes resumes from.

    Returns:
        The checkpoint folder (None off rank 0).
    """
    sharded = any(is_sharded(p) for p in trainable(model).values())
    if rank != 0 and not sharded:
        return None
    weights = {n: whole(t.detach()).cpu().contiguous() for n, t in trainable(model).items()}
    optimizer_state = whole_optimizer_state(optimizer) if sharded else optimizer.state_dict()
    if rank != 0:
        return None
    final = folder / f"step-{run.step:08d}"
    if final.exists():  # written earlier by this same run at this same step (resume is exact)
        _drop_older_checkpoints(folder, final)
        return final
    check_finite(weights, kept=folder)
    blob = safetensors_save(weights, metadata={"format": "pt", "step": str(run.step)})
    state = _state(blob, model, optimizer_state, scaler, config, plan, run)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: a full disk is then an OSError of the write below
    files = {"trainable.safetensors": blob, "state.pt": buffer.getvalue()}
    _write_checkpoint(folder, final, files, run.step)
    _drop_older_checkpoints(folder, final)
    return final


def _state(blob: bytes, model: nn.Module, optimizer_state: dict[str, Any], scaler: Any,
           config: TrainConfig, plan: BatchPlan, run: RunState) -> dict[str, Any]:
    """state.pt's contents: where the run stands, and what it must match to go on."""
    return {
        "format": FORMAT,
        "step": run.step,
        "total_steps": plan.total_steps,
        "world_size": plan.world,
        "config": config.to_dict(),
        "data": plan.position(run.step),
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "skipped": run.skipped,
        "bad_in_a_row": run.bad_in_a_row,
        "best_eval_loss": run.best_eval_loss,
        "fingerprint": None if config.full else base_fingerprint(model),
        "trainable_sha256": hashlib.sha256(blob).hexdigest(),
    }


def _write_checkpoint(folder: Path, final: Path, files: dict[str, bytes], step: int) -> None:
    """``files`` and their manifest written as the folder ``final``, whole or not at all
    (core.files.replace_folder).

    Raises:
        OSError: a write failed (a full disk); nothing of ``final`` is left and the message
            names the checkpoint that is kept.
    """
    manifest = {"format": FORMAT, "step": step,
                "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}

    def write(tmp: Path) -> None:
        for name, data in files.items():
            atomic_write(tmp / name, data)
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    try:
        replace_folder(final, write)
    except OSError as err:  # a full disk, say: the previous checkpoint stays the latest
        kept = latest_checkpoint(folder)
        what = f"{kept} is kept" if kept else "there is no earlier checkpoint"
        raise OSError(err.errno, f"cannot write checkpoint {final}: {err.strerror or err}; "
                      f"{what}") from err


def _drop_older_checkpoints(folder: Path, final: Path) -> None:
    """Remove the checkpoints before ``final`` and the temporary folders of torn writes
    (replace_folder's ``.step-N.tmp-PID``, and ``.tmp-step-N-PID`` of earlier versions)."""
    for old in folder.iterdir():
        if old != final and old.name.startswith(("step-", ".step-", ".tmp-")):
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (temporary folders are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.is_dir())
    return done[-1] if done else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Any, config: TrainConfig, plan: BatchPlan) -> RunState | None:
    """Restore the latest checkpoint under ``folder``; None when there is none.

    Raises:
        CheckpointError: it was written with another config (the differing fields are named),
            another number of processes, other data, another base, or its files are damaged.
    """
    path = latest_checkpoint(folder)
    if path is None:
        if plan.rank == 0:
            print(f"resume: no checkpoint in {folder}; starting at step 0", file=sys.stderr)
        return None
    blob = verified_checkpoint_files(path)["trainable.safetensors"]
    state = read_state(path)
    _check_same_run(path, state, config, plan)
    if hashlib.sha256(blob).hexdigest() != state["trainable_sha256"]:
        raise CheckpointError(f"{path}/trainable.safetensors: damaged (checksum mismatch)")
    if not config.full and state["fingerprint"] != base_fingerprint(model):
        raise CheckpointError(f"{path}: written for another base model (fingerprint differs)")
    _load_trainable(path, model, safetensors_load(blob))
    optimizer.load_state_dict(state["optimizer"])
    shard_optimizer_state(optimizer)  # FSDP: the whole moments back into this rank's shards
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return RunState(step=state["step"], skipped=state["skipped"],
                     bad_in_a_row=state["bad_in_a_row"], best_eval_loss=state["best_eval_loss"])


def verified_checkpoint_files(path: Path) -> dict[str, bytes]:
    """The files of checkpoint ``path``, each read once and checked against its manifest.

    Raises:
        CheckpointError: no manifest (not minilora's, or written before manifests), a file
            missing, or a file whose SHA-256 differs from the manifest's (damaged).
    """
    try:
        manifest = read_json(path / MANIFEST, "a checkpoint manifest", error=CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a minilora checkpoint (no {MANIFEST}); train into "
                              "another {out_dir}", fields={"out_dir": "out_dir"}) from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    needed = {"trainable.safetensors", "state.pt"}
    if (not isinstance(listed, dict) or not needed <= set(listed)
            or not all(isinstance(v, str) for v in listed.values())):
        raise CheckpointError(f"{path}/{MANIFEST}: expected {{\"files\": {{name: sha256}}}} "
                              f"naming {sorted(needed)}")
    files = {}
    for name in sorted(needed):
        try:
            files[name] = read_bounded(path / name, _MAX_CHECKPOINT_FILE, "a checkpoint file")
        except FileNotFoundError:
            raise CheckpointError(f"{path}/{name}: missing") from None
        if hashlib.sha256(files[name]).hexdigest() != listed[name]:
            raise CheckpointError(f"{path}/{name}: damaged (checksum mismatch)")
    return files


# What state.pt must hold, and of which type: a checkpoint that is not minilora's (or a newer
# layout) is refused by name rather than failing on a missing key deep in the resume.
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int, "step": int, "total_steps": int, "world_size": int, "config": dict,
    "data": dict, "optimizer": dict, "scaler": (dict, type(None)), "skipped": int,
    "bad_in_a_row": int, "best_eval_loss": (float, type(None)), "fingerprint": (str, type(None)),
    "trainable_sha256": str,
}


def _check_state(path: Path, state: object) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}/state.pt: not a minilora checkpoint (a "
                              f"{type(state).__name__}, expected a dict)")
    problems = [f"{k} is missing" if k not in state else
                f"{k} is {type(state[k]).__name__}, expected "
                f"{' or '.join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))}"
                for k, kind in _STATE_FIELDS.items()
                if k not in state or isinstance(state[k], bool) or not isinstance(state[k], kind)]
    if problems:
        raise CheckpointError(f"{path}/state.pt: not a minilora checkpoint: "
                              + "; ".join(problems))
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}/state.pt: checkpoint format {state['format']}, this "
                              f"minilora reads format {FORMAT}")


def _check_same_run(path: Path, state: dict[str, Any], config: TrainConfig,
                    plan: BatchPlan) -> None:
    # A field added since the checkpoint was written is at its default there.
    saved, now = {**field_defaults(), **renamed_keys(state["config"])}, config.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
             if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    said: set[str] = set()  # the data position's fields a difference above already explains
    if state["world_size"] != plan.world and saved.get("fsdp") and config.fsdp:
        diffs = [d for d in diffs if not d.startswith("batch_size:")]
        regrouped = _regrouped(saved["batch_size"], state["world_size"], config.batch_size,
                               plan.world)
        diffs += regrouped
        said = {"global_batch", "epoch", "batch"} if regrouped else said
    elif state["world_size"] != plan.world:
        diffs.append(f"processes: {state['world_size']} in the checkpoint, {plan.world} now")
    saved_data, data_now = state["data"], plan.position(state["step"])
    diffs += [f"data.{k}: {saved_data.get(k)} in the checkpoint, {data_now[k]} now"
              for k in data_now if saved_data.get(k) != data_now[k] and k not in said]
    if diffs:
        raise CheckpointError(
            f"{path} was written by a different run; refusing to resume: " + "; ".join(diffs)
            + ". Resume with the same settings, or train into a new {out_dir}.",
            fields={"out_dir": "out_dir"})


def _regrouped(batch_then: int, world_then: int, batch_now: int, world_now: int) -> list[str]:
    """An FSDP checkpoint resumes on another number of processes when the global batch stays
    the same (each process then takes another share of it): what differs, else nothing."""
    rows = batch_then * world_then
    if batch_now * world_now == rows:
        return []
    if rows % world_now:
        return [f"processes: the global batch of {rows} rows ({batch_then} x "
                f"{_processes(world_then)} in the checkpoint) does not divide over "
                f"{_processes(world_now)}; "
                f"resume on a number of processes that divides {rows}"]
    return [f"batch_size: {batch_then} x {_processes(world_then)} in the checkpoint, "
            f"{batch_now} x {_processes(world_now)} now; resume with batch_size "
            f"{rows // world_now} on {_processes(world_now)} (the global batch stays the same)"]


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


# Checkpoints written before adapters were keyed by name (minilora 0.1) hold the
# default adapter's A and B as <path>.lora_A.weight: read them under today's names.
_UNNAMED_ADAPTER = re.compile(r"\.(lora_A|lora_B)\.weight$")


def _load_trainable(path: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = trainable(model)
    weights = {_UNNAMED_ADAPTER.sub(r".\1.default.weight", n): t for n, t in weights.items()}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    shapes = [n for n in params if n in weights and weights[n].shape != params[n].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}/trainable.safetensors does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, shape {shapes[:5]}")
    for name, p in params.items():
        load_whole_(p, weights[name])


def read_state(path: Path) -> dict[str, Any]:
    """The state.pt of checkpoint ``path``, checked against its manifest before it is unpickled
    (weights_only) and checked to be minilora's.

    Raises:
        CheckpointError: no manifest, a damaged file, a refused pickle, or not minilora's.
    """
    blob = verified_checkpoint_files(path)["state.pt"]
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated file, ...
        raise CheckpointError(f"{path}: cannot read the checkpoint, damaged or not minilora's "
                              f"({torch_load_reason(err)})") from None
    _check_state(path, state)
    return state


def unfinished(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` stops before the end of its schedule (a damaged one counts)."""
    try:
        state = read_state(checkpoint)
    except (CheckpointError, OSError):  # damaged or not minilora's: never replaced silently
        return True
    return state["step"] < state["total_steps"]
