"""The training loop: LoRA (or full) fine-tuning of a causal LM on jsonl data.

``train(model, train_set, config, eval_set)`` starts and ends the processes; its body, ``_fit``,
reads top to bottom, and the helpers beside it each do one thing (``lr_at``, ``_step``,
``evaluate``). The settings are config.py's, the rows datasets.py's, the checkpoint
format checkpoint.py's, the run's log run_log.py's. The step is MiniMind's LoRA step:
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minilora.adapters.folder import save_adapter
from minilora.adapters.state import adapter_state_dict
from minilora.core.errors import ConfigError, TrainError
from minilora.core.files import atomic_write, read_bounded
from minilora.core.tensor_checks import is_sharded
from minilora.data.preference import PairDataset
from minilora.data.sft import Batch, DataStats, JsonlDataset
from minilora.data.tokenizer import Tokenizer
from minilora.decoding.sampling import (
    GENERATION_CONFIG,
    MAX_GENERATION_CONFIG,
    read_generation_config,
)
from minilora.lora.injection import (
    check_excludes_match,
    inject_lora,
    lora_parameters,
    mark_trainable,
    unmerge_lora,
)
from minilora.lora.layer import lora_modules
from minilora.lora.qlora import quantize_model
from minilora.lora.quantized_weight import require_bitsandbytes
from minilora.model.decoder import CausalLM
from minilora.model.io import save_model
from minilora.training.answer_tokens import with_answer_tokens
from minilora.training.checkpoint import (
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
from minilora.training.fsdp import (
    check_launch,
    shard_and_load,
    shard_model,
    stand_in,
    unloaded,
    whole,
)
from minilora.training.interrupt import StopAfterStep
from minilora.training.memory import estimate_memory, measured_peak
from minilora.training.optimizer import build_optimizer, set_lr
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
from minilora.training.run_layout import RunLayout
from minilora.training.run_log import (
    RunLog,
    plot_losses,
    print_run_plan,
    require_tensorboard,
    start_outputs,
)
from minilora.training.task_eval import load_task_samples, task_accuracy


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
          eval_set: JsonlDataset | None = None, *, tokenizer: Tokenizer | None = None,
          compile_backend: Any = None) -> TrainResult:
    """Fine-tune ``model`` in place: LoRA adapters (default) or every weight (``full``).

    Run under torchrun (WORLD_SIZE > 1) it trains data-parallel: each process takes its share of
    every global batch and the gradients are summed across processes, so N processes of
    batch_size B compute what one process of batch_size N x B computes; only rank 0 writes.

    Args:
        model: a CausalLM-like module: ``model(input_ids, labels=...)`` returns an object with
            ``loss`` (mean over the labels that are not -100) and ``aux_loss``. With ``fsdp``
            it may be on the meta device (model.io.load_skeleton of ``config.model``): each
            process then reads only its shards of ``config.model`` once the model is sharded.
        train_set: the rows to train on (``load_datasets(config, tokenizer)`` reads the files a
            config names).
        config: the run's settings.
        eval_set: held-out rows: loss and perplexity every eval_every steps and at the end.
        tokenizer: the model's tokenizer; needed only with ``config.eval_tasks`` (the task
            questions are asked through its chat template).
        compile_backend: with ``config.compile``, the torch.compile backend (default
            "inductor"; a cheaper or a counting one in tests).

    The caller's global torch RNG is left as it was: the run seeds its own (forked) state from
    ``config.seed``, so a run is reproducible and the caller's random numbers do not change.

    Returns:
        A TrainResult. Under out_dir: the parts training.run_layout.RunLayout names (the last
        adapter or model, the best one, checkpoints, metrics, the loss plot, the config).

    Raises:
        DataError: a token id outside the model's vocabulary.
        CheckpointError: resume=True with a checkpoint of another config or base, or a damaged
            one; or resume=False where an unfinished checkpoint would be overwritten.
        TrainError: max_bad_steps non-finite steps in a row.
        TaskError: a file of ``config.eval_tasks`` that is not a task file.
        ConfigError: a sample longer than the model's context (max_position_embeddings); a
            model on the meta device without fsdp and config.model, or with from_adapter.
    """
    started = time.perf_counter()
    if unloaded(model) and (not config.fsdp or not config.model):
        raise ConfigError("the model is on the meta device (it holds no weights): load it with "
                          "model.io.load_model, or train with fsdp, which reads each process's "
                          "shards of the base the config's model names")
    if unloaded(model) and config.from_adapter:
        raise ConfigError("from_adapter needs the whole base to check the adapter against: load "
                          "the model with model.io.load_model")
    _check_context(model, config, train_set, eval_set)
    if config.model and Path(config.model).is_dir():  # what the run will copy: checked now
        read_generation_config(Path(config.model))
    scorer = _task_scorer(config, tokenizer)  # a bad task file: before anything is written
    # the rows of the answers' tokens; the end-of-turn tokens the base already writes are left
    config = with_answer_tokens(config, train_set, tokenizer.stop_token_ids if tokenizer else [])
    check_launch(config.fsdp)
    rank, world, device, own_group = start_distributed(config.device, group=config.fsdp)
    config, precision = _resolved(config, device, world)
    if config.log_to == "tensorboard":
        require_tensorboard()  # before the output folder is claimed
    if config.from_adapter:  # before anything is written: an adapter of another base is refused
        start_from_adapter(model, config)
    lock = claim_out(config, rank)
    log = RunLog(Path(config.out_dir), rank, config.log_to)
    log.precision = precision
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type):
            return _fit(model, train_set, eval_set, config,
                        _Place(rank, world, device, config.fsdp), log, started, scorer,
                        compile_backend)
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
    sharded: bool = False  # FSDP: each process holds a shard of every weight (fsdp.py)


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
    mid_step: bool = False  # True from the start of a step until its state.step is set
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


def _fit(model: nn.Module, train_set: JsonlDataset, eval_set: JsonlDataset | None,
         config: TrainConfig, place: _Place, log: RunLog, started: float,
         scorer: Scorer | None = None, compile_backend: Any = None) -> TrainResult:
    """train() once the processes are started: set up, the loop, the outputs."""
    if config.quantize:
        require_bitsandbytes()  # before writing anything
    for dataset in (train_set, eval_set):
        check_vocab(dataset, model)
    run = _start(model, train_set, config, place, log, compile_backend)
    start_step = run.state.step
    stop = min(run.plan.total_steps, config.stop_after or run.plan.total_steps)
    log.start(start_step, run.plan.total_steps)
    out = RunLayout(config.out_dir)
    model.train()
    with StopAfterStep(enabled=place.world == 1) as interrupt:
        try:
            losses, evals, tokens = _steps(run, start_step, stop, eval_set, config, place, log,
                                           interrupt, scorer)
        except KeyboardInterrupt:
            _checkpoint_what_was_done(run, config, place, start_step)
            raise
    if place.rank == 0:
        peak, what = measured_peak(place.device)
        print(f"memory: measured peak {peak / 2**30:.2f} GiB ({what})", file=sys.stderr)
    finished = run.state.step == run.plan.total_steps  # not a stop_after: its resume evaluates
    if (eval_set is not None or scorer is not None) and finished and (
            not evals or evals[-1]["step"] != run.state.step):
        evals.append(_evaluate_and_keep_best(run, eval_set, config, place, log, scorer))
    checkpoint = save_checkpoint(out.checkpoints, model, run.optimizer, run.scaler, config,
                                 run.plan, run.state, place.rank)
    output_dir = _save_weights(run, out.weights(config.full), config,
                               place.rank)
    if place.rank == 0:
        plot_losses(out.root)
    best = out.best
    return TrainResult(
        steps=run.state.step, total_steps=run.plan.total_steps, losses=losses, evals=evals,
        best_eval_loss=run.state.best_eval_loss, skipped_steps=run.state.skipped, tokens=tokens,
        seconds=time.perf_counter() - started, output_dir=output_dir,
        best_dir=best if place.rank == 0 and best.exists() else None, checkpoint_dir=checkpoint,
        data_stats=train_set.stats, start_step=start_step,
    )


def _steps(run: _Run, start_step: int, stop: int, eval_set: JsonlDataset | None,
           config: TrainConfig, place: _Place, log: RunLog, interrupt: StopAfterStep,
           scorer: Scorer | None = None
           ) -> tuple[list[tuple[int, float]], list[dict[str, float]], int]:
    """The optimizer steps from ``start_step`` to ``stop``, with their logs, evals and periodic
    checkpoints; returns the losses logged, the evals and the tokens trained on."""
    losses: list[tuple[int, float]] = []
    evals: list[dict[str, float]] = []
    tokens = 0
    out = RunLayout(config.out_dir)
    for step in range(start_step, stop):
        loss, step_tokens = _step(run, step, config, place)
        tokens += step_tokens
        losses += log.step(run.state.step, loss, lr_at(step, config, run.plan.total_steps),
                           step_tokens, run.state.skipped,
                           force=run.state.step == stop or run.state.step % config.log_every == 0,
                           rewards=run.rewards if loss is not None else None)
        evaluates = eval_set is not None or scorer is not None
        if evaluates and config.eval_every and run.state.step % config.eval_every == 0:
            evals.append(_evaluate_and_keep_best(run, eval_set, config, place, log, scorer))
        if config.save_every and run.state.step % config.save_every == 0 and run.state.step != stop:
            save_checkpoint(out.checkpoints, run.model, run.optimizer, run.scaler, config,
                            run.plan, run.state, place.rank)
        if interrupt.requested:  # Ctrl-C during this step: it is done, so stop here
            raise KeyboardInterrupt
    return losses, evals, tokens


def _checkpoint_what_was_done(run: _Run, config: TrainConfig, place: _Place,
                              start_step: int) -> None:
    """Ctrl-C: a checkpoint at the last step done, so --resume goes on from there exactly. Not
    when it came in the middle of a step (a second Ctrl-C): its gradients are half summed and the
    optimizer may be half stepped, so the last checkpoint written stays the one to resume."""
    if place.world > 1 or run.mid_step or run.state.step == start_step:
        return  # several processes: a save is collective, and Ctrl-C reaches them unevenly
    save_checkpoint(RunLayout(config.out_dir).checkpoints, run.model, run.optimizer, run.scaler,
                    config, run.plan, run.state, place.rank)


def _start(model: nn.Module, train_set: JsonlDataset, config: TrainConfig, place: _Place,
           log: RunLog, compile_backend: Any = None) -> _Run:
    """The model prepared, the optimizer, the resumed state, the run folder begun."""
    plan = BatchPlan(train_set, config, place.rank, place.world)
    out = RunLayout(config.out_dir)
    torch.manual_seed(config.seed)  # LoRA init: the same on every rank
    from_file = place.sharded and unloaded(model)
    # LoRA drawn as on the loaded model; each rank reads its shards below
    stand_ins = stand_in(model) if from_file else set()
    params = _prepare_model(model, config)
    pissa_start = None
    if not config.full and config.lora_init == "pissa":  # before a checkpoint overwrites it
        pissa_start = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    set_activation_checkpointing(model, config.activation_checkpointing)
    if config.quantize:
        report = quantize_model(model, config.quantize, place.device)
        if place.rank == 0:
            print(report, file=sys.stderr)
    if place.sharded:
        # fully_shard moves one block at a time to the device and keeps only its shard there,
        # so the device never holds the whole model. No broadcast first (it would need the
        # whole model on the device with nccl): every rank loaded the same base and drew the
        # same LoRA init from the same seed above. A model on the meta device
        # (model.io.load_skeleton) is sharded before it holds any value: each rank then reads
        # only its shards of config.model.
        params = (shard_and_load(model, Path(str(config.model)), place.device, place.world,
                                 stand_ins)
                  if from_file else shard_model(model, place.device, place.world))
    else:
        model.to(place.device)
        broadcast(params, place.world)
    optimizer = build_optimizer(model, params, config)
    amp_dtype = autocast_dtype(config.amp_dtype, place.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loaded = None
    if config.resume:
        loaded = load_checkpoint(out.checkpoints, model, optimizer, scaler, config, plan)
    if loaded is None:  # no checkpoint to resume from: a fresh run, which may not overwrite a
        # finished run's outputs; a run killed before its first checkpoint starts over (the
        # best/ its evals kept is that unfinished run's own, replaced with it)
        started_only = config.resume and not any(
            p.exists() for p in (out.adapter, out.model))
        replace_earlier_run(out.root, config.overwrite or started_only, place.rank)
    state = loaded or RunState()
    if place.rank == 0:
        start_outputs(out.root, config, state.step, train_set.stats)
        print_run_plan(model, config, plan, place.device, log.precision, state.step)
        _print_memory_estimate(model, config, amp_dtype, place.device)
    preference = None
    if config.method != "sft":
        reference = REFERENCE if config.from_adapter and config.method == "dpo" else None
        preference = PreferenceLoss(config, reference)
    return _Run(model, _compiled(model, config, compile_backend), params, optimizer, scaler,
                amp_dtype, plan, state, pissa_start, preference=preference)


def _check_context(model: nn.Module, config: TrainConfig, *datasets: Any) -> None:
    """Refuse samples longer than the model's context (positions it never saw), as generate
    refuses such a prompt; with max_seq_len within the context none can be."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or config.max_seq_len <= context:
        return
    for dataset in datasets:
        if dataset is None or getattr(dataset, "packed", False):
            continue
        longest = max((_longest_row(s) for s in getattr(dataset, "samples", [])), default=0)
        if longest > context:
            raise ConfigError(
                f"{getattr(dataset, 'path', 'the data')}: a sample of {longest} tokens is longer "
                f"than the model's context (max_position_embeddings: {context} tokens); use "
                f"{{max_seq_len}} {context} or less", fields={"max_seq_len": "max_seq_len"})


def _longest_row(sample: Any) -> int:
    """A sample's longest row: a preference pair's chosen and rejected rows run apart."""
    if hasattr(sample, "chosen") and hasattr(sample, "rejected"):
        return max(len(sample.chosen.input_ids), len(sample.rejected.input_ids))
    return len(sample.input_ids)


def _compiled(model: nn.Module, config: TrainConfig, backend: Any = None) -> Any:
    """What the loop calls for the forward: the model, or with ``compile`` the forward compiled
    once per run (see compiled.py) by ``backend`` (default inductor)."""
    return CompiledLoss(model, config.max_seq_len, backend) if config.compile else model


def _step(run: _Run, step: int, config: TrainConfig, place: _Place
          ) -> tuple[torch.Tensor | None, int]:
    """One optimizer step; returns its loss (None when skipped as non-finite) and its tokens."""
    run.mid_step = True
    set_lr(run.optimizer, lr_at(step, config, run.plan.total_steps))
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
    step_loss = sync_gradients(run.params, step_loss, place.world, place.sharded)
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
    run.mid_step = False
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
        assert run.preference is not None  # called for a preference method only
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
        norm = torch.nn.utils.get_total_norm([p.grad.float() for p in grads
                                              if p.grad is not None])
    norm = whole(norm)  # FSDP: the norm over every rank's shards
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
        check_excludes_match(model, config.lora_exclude)
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
    switch = "activation_checkpointing"  # minilora's CausalLM's, a plain bool attribute
    hf_enable = getattr(model, "gradient_checkpointing_enable", None)  # transformers' method
    if hasattr(model, switch):
        setattr(model, switch, enabled)
    elif enabled and hf_enable is not None:
        hf_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def _evaluate_and_keep_best(run: _Run, eval_set: JsonlDataset | None, config: TrainConfig,
                            place: _Place, log: RunLog, scorer: Scorer | None = None
                            ) -> dict[str, float]:
    # Under FSDP every rank runs every forward (each one gathers the blocks from all ranks),
    # so each evaluates the whole set rather than a share of it.
    rank, world = (0, 1) if place.sharded else (place.rank, place.world)
    record: dict[str, float] = {"step": run.state.step}
    if eval_set is not None and run.preference is not None:
        assert isinstance(eval_set, PairDataset)  # a preference method reads pairs
        record.update(evaluate_preference(run.model, eval_set, run.preference, config.batch_size,
                                          device=place.device, amp_dtype=run.amp_dtype,
                                          rank=rank, world=world))
    elif eval_set is not None:
        record.update(evaluate(run.model, eval_set, config.batch_size, device=place.device,
                               amp_dtype=run.amp_dtype, rank=rank, world=world))
    if scorer is not None and place.rank == 0:  # generation: rank 0 alone, like the writes
        record.update(scorer(run.model))
    log.eval(record)
    if eval_set is None:
        return record
    if run.state.best_eval_loss is None or record["eval_loss"] < run.state.best_eval_loss:
        run.state.best_eval_loss = record["eval_loss"]
        _save_weights(run, RunLayout(config.out_dir).best, config, place.rank)
    return record


Scorer = Callable[[nn.Module], dict[str, float]]


def _task_scorer(config: TrainConfig, tokenizer: Tokenizer | None) -> Scorer | None:
    """The task accuracy each evaluation adds, when ``config.eval_tasks`` names task files.

    Raises:
        ConfigError: eval_tasks without a tokenizer to ask the questions with.
        TaskError: a file that is not a task file.
    """
    if not config.eval_tasks:
        return None
    if tokenizer is None:
        raise ConfigError("{eval_tasks} asks questions through the model's chat template: pass "
                          "train(..., tokenizer=...)", fields={"eval_tasks": "eval_tasks"})
    samples = load_task_samples(config.eval_tasks)
    return lambda model: task_accuracy(model, tokenizer, samples)


def _save_weights(run: _Run, folder: Path, config: TrainConfig, rank: int) -> Path | None:
    """The adapter (or, with full=True, the whole model) into ``folder``; rank 0 only. A PiSSA
    adapter is written as a plain LoRA for the original base, which is what its users load.
    Under FSDP every rank gathers the adapter's shards (rank 0 writes them)."""
    model = run.model
    gathered = None
    if any(is_sharded(p) for p in run.params):
        gathered = {k: whole(v).cpu() for k, v in adapter_state_dict(model).items()}
    if rank != 0:
        return None
    check_finite(gathered if gathered is not None else trainable(model),
                 kept=RunLayout(config.out_dir).checkpoints)
    try:
        if config.full:
            assert isinstance(model, CausalLM)  # save_model writes minilora's own model
            save_model(model, folder)
        else:
            save_adapter(model, folder, base_model_name_or_path=config.model,
                         pissa_initial=run.pissa_start, tensors=gathered)
        if config.model:  # a library run on a model built in memory names no folder
            _carry_generation_config(Path(config.model), folder)
    except OSError as err:  # a full disk, say: an fsync error names no file, so name the folder
        raise OSError(err.errno, f"cannot write {folder}: {err.strerror or err}") from err
    return folder


def _carry_generation_config(base: Path, folder: Path) -> None:
    """Copies the base folder's generation_config.json, if it has one, into ``folder``: an
    adapter or model folder the run writes carries the base's sampling defaults, so chat,
    generate and serve sample the trained model as the base's authors meant. train() checked
    the file (decoding.sampling's reader) before the run began."""
    source = base / GENERATION_CONFIG
    if base.is_dir() and source.is_file():
        atomic_write(folder / GENERATION_CONFIG,
                     read_bounded(source, MAX_GENERATION_CONFIG, "a generation_config.json"))
