"""The training loop: LoRA (or full) fine-tuning of a causal LM on jsonl data.

``train(model, train_set, config, eval_set)`` starts and ends the processes; its body, ``_fit``,
reads top to bottom, and the helpers beside it each do one thing (``lr_at``, ``_step``,
``evaluate``). The settings are train_config.py's, the rows train_data.py's, the checkpoint
format checkpoint.py's, the run's log run_log.py's. The step is the seed's:
inject LoRA, freeze the rest, AdamW over the trainable parameters only, masked cross-entropy plus
the MoE aux loss, autocast, accumulation, clipping of the trainable gradients only, step,
``zero_grad(set_to_none=True)``. A preference method (``config.method`` dpo or simpo) replaces
only the micro-batch's cross-entropy with its loss over pairs (preference.py); the rest of the
step is the same.

Two choices make runs exactly reproducible and comparable:

- The loss of an optimizer step is the mean over the trained tokens of its whole global batch
  (every micro-batch of every process), not a mean of per-micro-batch means. So k micro-batches
  of accumulation give the gradient of one batch k times larger, and N processes give the
  gradient of one process with the same global batch, whatever the token counts.
- Random numbers (LoRA dropout) are reseeded from (seed, step, rank) at every step, and the data
  order is a function of (seed, epoch): a resumed run sees exactly what an uninterrupted one saw.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minilora.adapters.folder import save_adapter
from minilora.adapters.state import adapter_state_dict
from minilora.core.errors import ConfigError, TrainError
from minilora.data.sft import Batch, DataStats, JsonlDataset
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable, unmerge_lora
from minilora.lora.layer import lora_modules
from minilora.lora.qlora import quantize_model
from minilora.lora.quantized_weight import require_bitsandbytes
from minilora.model.io import save_model
from minilora.training.checkpoint import (
    CHECKPOINTS,
    RunState,
    check_finite,
    load_checkpoint,
    save_checkpoint,
    trainable,
)
from minilora.training.compiled import CompiledLoss
from minilora.training.config import TrainConfig
from minilora.training.datasets import BatchPlan, check_vocab
from minilora.training.distributed import broadcast, start_distributed, sync_gradients
from minilora.training.memory import estimate_memory, measured_peak
from minilora.training.precision import autocast_dtype, resolve_precision
from minilora.training.preference import (
    METRICS,
    REFERENCE,
    PreferenceLoss,
    evaluate_preference,
    mean_metrics,
    start_from_adapter,
)
from minilora.training.run_folder import claim_out, replace_earlier_run
from minilora.training.run_log import RunLog, describe_run, plot_losses, start_outputs


@dataclass
class TrainResult:
    """What a train() call did."""

    steps: int  # optimizer steps done in all (a resumed run's earlier ones included)
    total_steps: int  # the steps the schedule spans
    losses: list[tuple[int, float]]  # (step, mean train loss since the previous log), this call
    evals: list[dict[str, float]]  # {"step", "eval_loss", "eval_ppl", "eval_tokens"}, this call
    best_eval_loss: float | None  # the lowest eval loss so far (resumed runs included)
    skipped_steps: int  # steps skipped for a non-finite loss or gradient
    tokens: int  # tokens trained on in this call (all processes)
    seconds: float  # wall time of this call
    output_dir: Path | None  # the last adapter (or model folder with full=True); None off rank 0
    best_dir: Path | None  # the adapter (or model) of the best eval loss
    checkpoint_dir: Path | None  # the latest checkpoint
    data_stats: DataStats  # what reading the training file kept and dropped
    start_step: int = 0  # the step this call began at (a resumed run's checkpoint step)


def train(model: nn.Module, train_set: JsonlDataset, config: TrainConfig,
          eval_set: JsonlDataset | None = None) -> TrainResult:
    """Fine-tune ``model`` in place: LoRA adapters (default) or every weight (``full``).

    Run under torchrun (WORLD_SIZE > 1) it trains data-parallel: each process takes its share of
    every global batch and the gradients are summed across processes, so N processes of
    batch_size B compute what one process of batch_size N x B computes; only rank 0 writes.

    Args:
        model: a CausalLM-like module: ``model(input_ids, labels=...)`` returns an object with
            ``loss`` (mean over the labels that are not -100) and ``aux_loss``.
        train_set: the rows to train on (``load_datasets(config, tokenizer)`` reads the files a
            config names).
        config: the run's settings.
        eval_set: held-out rows: loss and perplexity every eval_every steps and at the end.

    Returns:
        A TrainResult. Under out_dir: ``adapter/`` (or ``model/``), ``best/``, ``checkpoints/``,
        ``metrics.jsonl``, ``loss.png``, ``config.json``.

    Raises:
        DataError: a token id outside the model's vocabulary.
        CheckpointError: resume=True with a checkpoint of another config or base, or a damaged
            one; or resume=False where an unfinished checkpoint would be overwritten.
        TrainError: max_bad_steps non-finite steps in a row.
    """
    started = time.perf_counter()
    rank, world, device, own_group = start_distributed(config.device)
    config, precision = _resolved(config, device, world)
    if config.from_adapter:  # before anything is written: an adapter of another base is refused
        start_from_adapter(model, config)
    lock = claim_out(config, rank)
    log = RunLog(Path(config.out_dir), rank)
    log.precision = precision
    try:
        return _fit(model, train_set, eval_set, config, _Place(rank, world, device), log, started)
    finally:  # on an error too: the progress bar ends, and the process group this call began
        log.close()
        if lock is not None:
            lock.release()
        if own_group:
            dist.destroy_process_group()


@dataclass
class _Place:
    """Where this process runs."""

    rank: int
    world: int
    device: torch.device


@dataclass
class _Run:
    """What the loop works with, set up once by ``_start``."""

    model: nn.Module
    forward: Any  # the model, or its CompiledLoss
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any  # a GradScaler with float16, else None
    amp_dtype: torch.dtype | None
    plan: BatchPlan
    state: RunState
    # A PiSSA adapter's A and B as initialised (from the base's SVD): its saved adapters are
    # converted with them into plain LoRA for the original base (see save_adapter).
    pissa_start: dict[str, torch.Tensor] | None = None
    # A preference method's loss (training/preference.py); None for SFT.
    preference: PreferenceLoss | None = None
    rewards: torch.Tensor | None = None  # the last step's mean rewards (METRICS), preference only


def _resolved(config: TrainConfig, device: torch.device, world: int
              ) -> tuple[TrainConfig, str]:
    """The config with "auto" replaced by what it means here (config.json records what ran), and
    the precision in words with its reason."""
    name, precision = resolve_precision(config.amp_dtype, device)
    changes: dict[str, Any] = {"amp_dtype": name}
    if world == 1 and config.device == "auto":  # under torchrun each rank has its own device
        changes["device"] = str(device)
    return replace(config, **changes), precision


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused where torch has the kernel: LoRA has two small
    tensors per adapted layer, and the unfused loop pays a dozen tiny ops for each of them."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4 on a CPU, or a device without the kernel
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _fit(model: nn.Module, train_set: JsonlDataset, eval_set: JsonlDataset | None,
         config: TrainConfig, place: _Place, log: RunLog, started: float) -> TrainResult:
    """train() once the processes are started: set up, the loop, the outputs."""
    if config.quantize:
        require_bitsandbytes()  # before writing anything
    for dataset in (train_set, eval_set):
        check_vocab(dataset, model)
    run = _start(model, train_set, config, place, log)
    start_step = run.state.step
    stop = min(run.plan.total_steps, config.stop_after or run.plan.total_steps)
    log.start(start_step, run.plan.total_steps)
    losses: list[tuple[int, float]] = []
    evals: list[dict[str, float]] = []
    tokens = 0
    out = Path(config.out_dir)
    model.train()
    for step in range(start_step, stop):
        loss, step_tokens = _step(run, step, config, place)
        tokens += step_tokens
        losses += log.step(run.state.step, loss, lr_at(step, config, run.plan.total_steps),
                           step_tokens, run.state.skipped,
                           force=run.state.step == stop or run.state.step % config.log_every == 0,
                           rewards=run.rewards if loss is not None else None)
        if eval_set is not None and config.eval_every and run.state.step % config.eval_every == 0:
            evals.append(_evaluate_and_keep_best(run, eval_set, config, place, log))
        if config.save_every and run.state.step % config.save_every == 0 and run.state.step != stop:
            save_checkpoint(out / CHECKPOINTS, model, run.optimizer, run.scaler, config, run.plan,
                            run.state, place.rank)
    if place.rank == 0:
        peak, what = measured_peak(place.device)
        print(f"memory: measured peak {peak / 2**30:.2f} GiB ({what})", file=sys.stderr)
    finished = run.state.step == run.plan.total_steps  # not a stop_after: its resume evaluates
    if eval_set is not None and finished and (not evals or evals[-1]["step"] != run.state.step):
        evals.append(_evaluate_and_keep_best(run, eval_set, config, place, log))
    checkpoint = save_checkpoint(out / CHECKPOINTS, model, run.optimizer, run.scaler, config,
                                 run.plan, run.state, place.rank)
    output_dir = _save_weights(run, out / ("model" if config.full else "adapter"), config,
                               place.rank)
    if place.rank == 0:
        plot_losses(out)
    best = out / "best"
    return TrainResult(
        steps=run.state.step, total_steps=run.plan.total_steps, losses=losses, evals=evals,
        best_eval_loss=run.state.best_eval_loss, skipped_steps=run.state.skipped, tokens=tokens,
        seconds=time.perf_counter() - started, output_dir=output_dir,
        best_dir=best if place.rank == 0 and best.exists() else None, checkpoint_dir=checkpoint,
        data_stats=train_set.stats, start_step=start_step,
    )


def _start(model: nn.Module, train_set: JsonlDataset, config: TrainConfig, place: _Place,
           log: RunLog) -> _Run:
    """The model prepared, the optimizer, the resumed state, the run folder begun."""
    plan = BatchPlan(train_set, config, place.rank, place.world)
    out = Path(config.out_dir)
    torch.manual_seed(config.seed)  # LoRA init: the same on every rank
    params = _prepare_model(model, config)
    pissa_start = None
    if not config.full and config.lora_init == "pissa":  # before a checkpoint overwrites it
        pissa_start = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    set_activation_checkpointing(model, config.activation_checkpointing)
    if config.quantize:
        report = quantize_model(model, config.quantize, place.device)
        if place.rank == 0:
            print(report, file=sys.stderr)
    model.to(place.device)
    broadcast(params, place.world)
    optimizer = _adamw(params, config)
    amp_dtype = autocast_dtype(config.amp_dtype, place.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loaded = None
    if config.resume:
        loaded = load_checkpoint(out / CHECKPOINTS, model, optimizer, scaler, config, plan)
    if loaded is None:  # no checkpoint to resume from: a fresh run, which may not overwrite a
        # finished run's outputs; a run killed before its first checkpoint starts over (the
        # best/ its evals kept is that unfinished run's own, replaced with it)
        started_only = config.resume and not any(
            (out / n).exists() for n in ("adapter", "model"))
        replace_earlier_run(out, config.overwrite or started_only, place.rank)
    state = loaded or RunState()
    if place.rank == 0:
        start_outputs(out, config, state.step, train_set.stats)
        describe_run(model, config, plan, place.device, log.precision, state.step)
        _print_memory_estimate(model, config, amp_dtype, place.device)
    preference = None
    if config.method != "sft":
        reference = REFERENCE if config.from_adapter and config.method == "dpo" else None
        preference = PreferenceLoss(config, reference)
    return _Run(model, _compiled(model, config), params, optimizer, scaler, amp_dtype, plan,
                state, pissa_start, preference)


def _compiled(model: nn.Module, config: TrainConfig) -> Any:
    """What the loop calls for the forward: the model, or with ``compile`` the forward compiled
    once per run (see compiled.py)."""
    return CompiledLoss(model, config.max_seq_len) if config.compile else model


def _step(run: _Run, step: int, config: TrainConfig, place: _Place
          ) -> tuple[torch.Tensor | None, int]:
    """One optimizer step; returns its loss (None when skipped as non-finite) and its tokens."""
    lr = lr_at(step, config, run.plan.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(_step_seed(config.seed, step, place.rank))  # dropout: resumable, per rank
    micro_batches, trained, step_tokens = run.plan.batches(step)
    # load_jsonl keeps no row without a trained token, but a hand-built dataset can give a
    # global batch with none: its loss is then 0 (the model's mean over no token), not 0/0,
    # on every rank alike (trained is the global batch's count), and the step goes on.
    trained = max(trained, 1)
    step_loss = torch.zeros((), device=place.device)
    rewards = torch.zeros(len(METRICS), device=place.device)
    for batch in micro_batches:
        batch = batch.to(place.device)
        if run.preference is not None:
            loss = _preference_loss(run, batch, len(micro_batches) * place.world, rewards)
        else:
            with torch.autocast(place.device.type, dtype=run.amp_dtype,
                                enabled=run.amp_dtype is not None):
                output = _run(run.forward, batch)
            # Token-weighted: the sum over all micro-batches and ranks is the global-batch mean.
            loss = (output.loss * (batch.trained_tokens / trained)
                    + output.aux_loss / (len(micro_batches) * place.world))
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        step_loss += loss.detach()
    step_loss = sync_gradients(run.params, step_loss, place.world)
    if run.preference is not None:
        run.rewards = mean_metrics(rewards, run.plan.global_batch, place.world)
    finite = _unscale_and_clip(run.params, step_loss, run.optimizer, run.scaler, config.grad_clip)
    if finite:
        run.state.bad_in_a_row = 0
        if run.scaler:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    else:
        run.state.skipped += 1
        run.state.bad_in_a_row += 1
        _stop_if_too_many_bad(run.state, step, config.max_bad_steps)
    if run.scaler:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step = step + 1
    return (step_loss if finite else None), step_tokens


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


def _preference_loss(run: _Run, batch: Batch, parts: int, rewards: torch.Tensor
                     ) -> torch.Tensor:
    """A micro-batch's share of the step's preference loss: its pairs' summed loss over the
    global batch's pairs (the sum over micro-batches and ranks is the global-batch mean), as
    the SFT loss is token-weighted; its reward sums are added to ``rewards``."""
    with torch.autocast(batch.input_ids.device.type, dtype=run.amp_dtype,
                        enabled=run.amp_dtype is not None):
        summed, aux, sums = run.preference(run.model, batch)
    rewards += sums.detach()
    return summed / run.plan.global_batch + aux / parts


def _run(forward: Any, batch: Batch) -> Any:
    # Packed rows carry their segments; a plain batch calls the model as any causal LM is called.
    if batch.segment_ids is None:
        return forward(batch.input_ids, labels=batch.labels)
    return forward(batch.input_ids, labels=batch.labels, segment_ids=batch.segment_ids)


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0): linear warmup, then a cosine from
    ``lr`` down to ``lr * min_lr_ratio`` at the end of ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_ratio
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _unscale_and_clip(params: list[nn.Parameter], step_loss: torch.Tensor,
                      optimizer: torch.optim.Optimizer, scaler: Any, grad_clip: float) -> bool:
    """Unscale (fp16), clip the trainable gradients, and say whether the step is finite.

    The one host sync of a step: the skip decision needs it. With a GradScaler, an overflowing
    gradient is the scaler's business (it skips and lowers its scale); only a non-finite loss
    counts as a bad step then.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads]))
    finite = torch.isfinite(step_loss)
    if scaler is None:
        finite = finite & torch.isfinite(norm)
    return bool(finite)


def _stop_if_too_many_bad(run: RunState, step: int, limit: int) -> None:
    if run.bad_in_a_row >= limit:
        raise TrainError(
            f"stopped at step {step + 1}: {run.bad_in_a_row} steps in a row had a non-finite "
            f"loss or gradient (skipped, nothing saved from them); lower {{lr}}, use {{amp_dtype}} "
            "float32, or check the data", fields={"lr": "lr", "amp_dtype": "amp_dtype"})


def _step_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes < 2**63


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def _prepare_model(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    """Inject LoRA (unless full or already there) and freeze; returns the trainable parameters."""
    if config.full:
        if lora_modules(model):
            raise ConfigError("full=True on a model with LoRA layers: merge_and_unload it first")
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    if lora_modules(model):
        unmerge_lora(model)  # a loaded adapter is trained further, with its own settings
    else:
        inject_lora(model, config.lora_config())
    mark_trainable(model)
    return lora_parameters(model)


def _print_memory_estimate(model: nn.Module, config: TrainConfig, amp_dtype: torch.dtype | None,
                           device: torch.device) -> None:
    """The "will it fit" line, before the first step (the measured peak follows the run)."""
    rows = config.batch_size * (1 if config.method == "sft" else 2)  # a pair is two rows
    estimate = estimate_memory(model, rows, config.max_seq_len,
                               amp_dtype=amp_dtype, device=device)
    print(estimate, file=sys.stderr)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turns activation checkpointing on or off: each decoder block is recomputed in backward.

    minilora's CausalLM has an ``activation_checkpointing`` switch; a transformers model gets
    ``gradient_checkpointing_enable`` (non-reentrant, as minilora's).

    Raises:
        ConfigError: enabled on a model that has neither.
    """
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = enabled
    elif enabled and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif enabled:
        raise ConfigError(f"activation_checkpointing: {type(model).__name__} has no "
                          "activation_checkpointing switch nor gradient_checkpointing_enable()")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, dataset: JsonlDataset, batch_size: int, *,
             device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
             rank: int = 0, world: int = 1) -> dict[str, float]:
    """Loss (mean per trained token) and perplexity of ``model`` on ``dataset``.

    Args:
        model: the model (put in eval mode for the call, then back).
        dataset: the held-out rows.
        batch_size: rows per forward.
        device: where the model is.
        amp_dtype: the autocast dtype, None for float32.
        rank: this process (batches are shared out round-robin).
        world: the number of processes (their sums are added up).

    Returns:
        ``{"eval_loss": token-weighted mean cross-entropy, "eval_ppl": exp(eval_loss),
        "eval_tokens": trained tokens counted}``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    check_vocab(dataset, model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, trained tokens
    for start in range(rank * batch_size, len(dataset), batch_size * world):
        batch = dataset.collate(range(start, min(start + batch_size, len(dataset)))).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = _run(model, batch)
        total[0] += output.loss.double() * batch.trained_tokens
        total[1] += batch.trained_tokens
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    loss = float(total[0] / total[1].clamp(min=1))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_tokens": int(total[1])}


def _evaluate_and_keep_best(run: _Run, eval_set: JsonlDataset, config: TrainConfig,
                            place: _Place, log: RunLog) -> dict[str, float]:
    if run.preference is not None:
        scores = evaluate_preference(run.model, eval_set, run.preference, config.batch_size,
                                     device=place.device, amp_dtype=run.amp_dtype,
                                     rank=place.rank, world=place.world)
    else:
        scores = evaluate(run.model, eval_set, config.batch_size, device=place.device,
                          amp_dtype=run.amp_dtype, rank=place.rank, world=place.world)
    record = {"step": run.state.step, **scores}
    log.eval(record)
    if run.state.best_eval_loss is None or record["eval_loss"] < run.state.best_eval_loss:
        run.state.best_eval_loss = record["eval_loss"]
        _save_weights(run, Path(config.out_dir) / "best", config, place.rank)
    return record


def _save_weights(run: _Run, folder: Path, config: TrainConfig, rank: int) -> Path | None:
    """The adapter (or, with full=True, the whole model) into ``folder``; rank 0 only. A PiSSA
    adapter is written as a plain LoRA for the original base, which is what its users load."""
    if rank != 0:
        return None
    model = run.model
    check_finite(trainable(model))
    try:
        if config.full:
            save_model(model, folder)
        else:
            save_adapter(model, folder, base_model_name_or_path=config.model,
                         pissa_initial=run.pissa_start)
    except OSError as err:  # a full disk, say: an fsync error names no file, so name the folder
        raise OSError(err.errno, f"cannot write {folder}: {err.strerror or err}") from err
    return folder
