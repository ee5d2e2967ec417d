"""The training loop: LoRA (or full) fine-tuning of a causal LM on jsonl data.

``train(model, data, config)`` starts and ends the processes; its body, ``_fit``, reads top to
bottom, and the helpers beside it each do one thing
(``lr_at``, ``evaluate``, ``save_checkpoint``, ``load_checkpoint``, ...). The step is the seed's:
inject LoRA, freeze the rest, AdamW over the trainable parameters only, masked cross-entropy plus
the MoE aux loss, autocast, accumulation, clipping of the trainable gradients only, step,
``zero_grad(set_to_none=True)``.

Two choices make runs exactly reproducible and comparable:

- The loss of an optimizer step is the mean over the trained tokens of its whole global batch
  (every micro-batch of every process), not a mean of per-micro-batch means. So k micro-batches
  of accumulation give the gradient of one batch k times larger, and N processes give the
  gradient of one process with the same global batch, whatever the token counts.
- Random numbers (LoRA dropout) are reseeded from (seed, step, rank) at every step, and the data
  order is a function of (seed, epoch): a resumed run sees exactly what an uninterrupted one saw.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from tqdm import tqdm

from minilora.adapter import base_fingerprint, save_adapter
from minilora.checks import MAX_TRAINED_WEIGHT, resolve_device
from minilora.compiled import CompiledLoss
from minilora.data import (
    Batch,
    DataStats,
    JsonlDataset,
    batch_indices,
    load_jsonl,
    pack_samples,
)
from minilora.errors import CheckpointError, ConfigError, DataError, OutputError, TrainError
from minilora.files import atomic_write, fsync_dir, read_bounded, read_json, torch_load_reason
from minilora.lora import (
    LoraConfig,
    inject_lora,
    lora_modules,
    lora_parameters,
    mark_trainable,
    unmerge_lora,
)
from minilora.memory import estimate_memory, measured_peak
from minilora.outputs import FolderLock, check_not_an_input, check_own_folder
from minilora.quant import QUANT_KINDS, quantize_model, require_bitsandbytes
from minilora.tokenizer import Tokenizer
from minilora.weights import save_model

DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECKPOINTS = "checkpoints"  # folder under out_dir holding step-NNNNNNNN checkpoints
MANIFEST = "manifest.json"  # in a checkpoint: the SHA-256 of each of its files, written last
_FORMAT = 1  # version of the checkpoint layout
_MAX_CHECKPOINT_FILE = 1 << 40  # read whole: a LoRA checkpoint is MBs; a --full one can be GBs
# Fields that do not change what is computed, so a resume may change them.
_RESUMABLE_CHANGES = (
    "data", "eval_data", "out_dir", "eval_every", "save_every", "compile", "resume",
    "log_every", "max_bad_steps", "stop_after", "device", "overwrite",
    "model", "tokenizer", "model_config",  # the base fingerprint in the checkpoint checks the base
    "activation_checkpointing",
)


def _arg(default: Any, doc: str) -> Any:
    """A TrainConfig field with its one-line doc in ``metadata["help"]`` (the --help text of
    ``minilora train``); a list default is copied for each config (a default_factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json beside its outputs."""

    data: str | None = _arg(None, "training data: .jsonl, .json or .parquet (chat, ShareGPT, "
                                  "Alpaca or text), or a folder of them")
    eval_data: str | None = _arg(None, "held-out jsonl: loss and perplexity every eval_every steps")
    out_dir: str = _arg("runs/minilora", "outputs: adapter, checkpoints, metrics.jsonl, loss.png")
    full: bool = _arg(False, "train every weight instead of LoRA adapters")
    lora_r: int = _arg(8, "rank of the LoRA update")
    lora_alpha: float = _arg(16.0, "the update is scaled by alpha / r (alpha / sqrt(r), rsLoRA)")
    lora_dropout: float = _arg(0.0, "dropout on the LoRA branch input, in [0, 1)")
    lora_targets: list[str] | str = _arg("all-linear", 'suffixes, regex, "all-linear" or "square"')
    lora_exclude: list[str] | str = _arg([], "suffixes or regex: never adapted")
    lora_init: str = _arg("gaussian", "init of A: gaussian (the seed's) or kaiming (PEFT's)")
    use_rslora: bool = _arg(False, "rank-stabilised scaling alpha / sqrt(r)")
    epochs: int = _arg(1, "passes over the data (when max_steps is None)")
    max_steps: int | None = _arg(None, "optimizer steps in all; None: epochs x steps per epoch")
    batch_size: int = _arg(8, "samples per micro-batch, per process")
    accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    lr: float = _arg(1e-4, "peak learning rate")
    min_lr_ratio: float = _arg(0.1, "the cosine ends at lr x min_lr_ratio")
    warmup_steps: int = _arg(0, "linear warmup from lr / warmup_steps to lr")
    weight_decay: float = _arg(0.0, "AdamW's decoupled weight decay")
    grad_clip: float = _arg(1.0, "max global norm of the trainable gradients; 0: no clipping")
    dtype: str = _arg("auto", 'autocast: "auto" | "float32" | "bfloat16" | "float16" (CUDA only)')
    max_seq_len: int = _arg(512, "samples are cut to this many tokens")
    pack: bool = _arg(False, "pack whole samples into rows of max_seq_len, each attending only "
                             "to itself, instead of one padded row a sample")
    eval_every: int = _arg(0, "evaluate every N steps; 0: at the end only")
    save_every: int = _arg(0, "checkpoint every N steps; 0: at the end only")
    seed: int = _arg(42, "LoRA init, data order and dropout")
    compile: bool = _arg(False, "run the forward through torch.compile")
    resume: bool = _arg(False, "continue from the latest checkpoint in out_dir")
    log_every: int = _arg(10, "log loss, lr and tokens/s every N steps")
    skip_bad: bool = _arg(False, "skip (and count) bad jsonl lines instead of stopping")
    max_bad_steps: int = _arg(5, "stop after this many non-finite steps in a row")
    stop_after: int | None = _arg(None, "end this run at this step (checkpointed), schedule kept")
    device: str = _arg("auto", '"auto" (cuda:LOCAL_RANK with CUDA, else cpu), "cpu", "cuda:0"')
    overwrite: bool = _arg(False, "replace the outputs of an earlier run in out_dir (without it, "
                                  "a folder holding a run is refused; --resume continues one)")
    # The base's path is recorded in config.json (a resume needs no retyping) and in the
    # adapter's base_model_name_or_path (PEFT's AutoPeftModel finds the base with it).
    model: str | None = _arg(None, "base model folder or MiniMind .pth (default: the embedded "
                                   "tiny model)")
    tokenizer: str | None = _arg(None, "tokenizer.json or its folder (default: the model's "
                                       "folder)")
    model_config: str | None = _arg(
        None, "the base's config when the model has no config.json beside it (a bare MiniMind "
              ".pth): MiniMind's config.json or transformers', or minimind2 / minimind3 for that "
              "MiniMind generation's defaults")
    replay: str | None = _arg(None, "data of what the base already does (its own answers), mixed "
                                    "in so the adapter keeps it")
    replay_ratio: float = _arg(0.5, "replay rows per training row (0.5: one replayed for two)")
    activation_checkpointing: bool = _arg(
        False, "recompute each decoder block in backward: less memory, about 1/3 more compute")
    quantize: str | None = _arg(
        None, 'QLoRA: the frozen Linears in bitsandbytes "nf4" (4-bit) or "int8"; needs '
        "minilora[qlora]")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"TrainConfig.{f.name}: expected a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"TrainConfig.seed: expected an integer in [0, 2**63), got "
                              f"{self.seed}")
        _check_device_name(self.device)
        positive = ("lora_r", "epochs", "batch_size", "accumulation_steps", "max_seq_len",
                    "log_every", "max_bad_steps", "max_steps", "stop_after")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"TrainConfig.{name}: expected an integer >= 1, got {value}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name}: expected >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"TrainConfig.lr: expected a finite number > 0, got {self.lr}")
        if not 0 <= self.replay_ratio <= 100 or not math.isfinite(self.replay_ratio):
            raise ConfigError(f"TrainConfig.replay_ratio: expected [0, 100], got "
                              f"{self.replay_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig.min_lr_ratio: expected [0, 1], got {self.min_lr_ratio}")
        if self.max_seq_len < 2:
            raise ConfigError(f"TrainConfig.max_seq_len: expected >= 2, got {self.max_seq_len}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"TrainConfig.dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANT_KINDS:
            raise ConfigError(f"TrainConfig.quantize: expected one of {QUANT_KINDS} or null, got "
                              f"{self.quantize!r}")
        if self.quantize is not None and self.full:
            raise ConfigError("TrainConfig.quantize: a quantized base is frozen; it cannot go "
                              "with full=True (--full trains every weight)")
        try:
            self.lora_config()  # r, alpha, dropout, targets, init
        except ValueError as err:
            raise ConfigError(f"TrainConfig.lora_*: {err}") from None

    def lora_config(self) -> LoraConfig:
        """The LoraConfig these settings describe."""
        return LoraConfig(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
            targets=self.lora_targets, exclude=self.lora_exclude, init=self.lora_init,
            use_rslora=self.use_rslora,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict such as ``to_dict()`` returns.

        Raises:
            ValueError: on an unknown key (naming it and listing the valid ones) or a bad value.
        """
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ConfigError(f"unknown TrainConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        """Write the config as JSON (atomically)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(Path(path), text)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a config written by ``save_json``.

        Raises:
            ValueError: on a file that is not a JSON object, or a bad key or value.
        """
        d = read_json(path, "a TrainConfig JSON file")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of TrainConfig fields")
        return cls.from_dict(d)


def _check_device_name(name: str) -> None:
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f'TrainConfig.device: unknown device {name!r}; expected "auto", '
                          '"cpu", "cuda" or "cuda:N"') from None


def _checked(name: str, value: Any, hint: Any) -> Any:
    """Check value against a field's type hint (int accepted for float); returns the value."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return value
        if origin is list and isinstance(value, (list, tuple)):
            if all(isinstance(v, str) for v in value):
                return list(value)
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option in (str, bool) and type(value) is option:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null")
                           for o in options)
    raise ConfigError(f"TrainConfig.{name}: expected {expected}, got {value!r}")


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


def train(
    model: nn.Module,
    data: Tokenizer | JsonlDataset,
    config: TrainConfig,
    *,
    eval_data: JsonlDataset | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place: LoRA adapters (default) or every weight (``full``).

    Run under torchrun (WORLD_SIZE > 1) it trains data-parallel: each process takes its share of
    every global batch and the gradients are summed across processes, so N processes of
    batch_size B compute what one process of batch_size N x B computes; only rank 0 writes.

    Args:
        model: a CausalLM-like module: ``model(input_ids, labels=...)`` returns an object with
            ``loss`` (mean over the labels that are not -100) and ``aux_loss``.
        data: a Tokenizer (the files config.data / config.eval_data are read with it) or a
            JsonlDataset to train on.
        config: the run's settings.
        eval_data: a held-out JsonlDataset, when ``data`` is a dataset.

    Returns:
        A TrainResult. Under out_dir: ``adapter/`` (or ``model/``), ``best/``, ``checkpoints/``,
        ``metrics.jsonl``, ``loss.png``, ``config.json``.

    Raises:
        DataError: a bad training or eval file.
        CheckpointError: resume=True with a checkpoint of another config or base, or a damaged
            one; or resume=False where an unfinished checkpoint would be overwritten.
        TrainError: max_bad_steps non-finite steps in a row.
    """
    started = time.perf_counter()
    rank, world, device, own_group = _start_distributed(config.device)
    config, precision = _resolved(config, device, world)
    lock = _claim_out(config, rank)
    log = _Log(Path(config.out_dir), rank)
    log.precision = precision
    try:
        return _fit(model, data, config, eval_data, rank, world, device, log, started)
    finally:  # on an error too: the progress bar ends, and the process group this call began
        log.close()
        if lock is not None:
            lock.release()
        if own_group:
            dist.destroy_process_group()


def _resolved(config: TrainConfig, device: torch.device, world: int
              ) -> tuple[TrainConfig, str]:
    """The config with "auto" replaced by what it means here (config.json records what ran), and
    the precision in words with its reason."""
    amp = autocast_dtype(config.dtype, device)
    name = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[amp]
    if config.dtype != "auto":
        why = "as asked"
    elif device.type == "cpu":
        why = ("this CPU has avx512_bf16/AMX" if amp is not None
               else "this CPU has no bfloat16 units, emulated bf16 would be slower")
    else:
        why = f"{device.type} {'computes' if amp is not None else 'lacks'} bfloat16 natively"
    precision = f"{name} autocast ({why})" if amp is not None else f"float32 ({why})"
    changes: dict[str, Any] = {"dtype": name}
    if world == 1 and config.device == "auto":  # under torchrun each rank has its own device
        changes["device"] = str(device)
    return replace(config, **changes), precision


def _describe_run(model: nn.Module, config: TrainConfig, plan: _BatchPlan, device: torch.device,
                  precision: str, start_step: int) -> None:
    """One block before the first step: what will run, where, and how much."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = "every weight (full fine-tuning)" if config.full else (
        f"{len(lora_modules(model))} Linear modules (rank {config.lora_r})")
    rows = sum(len(s.input_ids) for s in plan.dataset.samples) / max(len(plan.dataset), 1)
    steps = (f"{plan.total_steps} ({plan.steps_per_epoch} per epoch)" if not start_step
             else f"{plan.total_steps - start_step} left of {plan.total_steps}")
    lines = [
        f"device      {device}",
        f"precision   {precision}",
        f"threads     {torch.get_num_threads()} (intra-op)",
        f"parameters  {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        f"adapted     {adapted}",
        f"steps       {steps}",
        f"per step    {plan.global_batch} rows, about {plan.global_batch * rows:,.0f} tokens",
    ]
    print("\n".join("run: " + line for line in lines), file=sys.stderr)


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused where torch has the kernel: LoRA has two small
    tensors per adapted layer, and the unfused loop pays a dozen tiny ops for each of them."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4 on a CPU, or a device without the kernel
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _fit(model: nn.Module, data: Tokenizer | JsonlDataset, config: TrainConfig,
         eval_data: JsonlDataset | None, rank: int, world: int, device: torch.device, log: _Log,
         started: float) -> TrainResult:
    """train() once the processes are started: data, model, the loop, the outputs."""
    if config.quantize:
        require_bitsandbytes()  # before reading data or writing anything
    train_set, eval_set = _datasets(data, eval_data, config)
    for dataset in (train_set, eval_set):
        _check_vocab(dataset, model)
    plan = _BatchPlan(train_set, config, rank, world)
    out = Path(config.out_dir)

    torch.manual_seed(config.seed)  # LoRA init: the same on every rank
    params = _prepare_model(model, config)
    set_activation_checkpointing(model, config.activation_checkpointing)
    if config.quantize:
        report = quantize_model(model, config.quantize, device)
        if rank == 0:
            print(report, file=sys.stderr)
    model.to(device)
    _broadcast(params, world)
    optimizer = _adamw(params, config)
    amp_dtype = autocast_dtype(config.dtype, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    run = _RunState()
    loaded = None
    if config.resume:
        loaded = load_checkpoint(out / CHECKPOINTS, model, optimizer, scaler, config, plan)
    if loaded is None:  # no checkpoint to resume from: a fresh run, which may not overwrite a
        # finished run's outputs; a run killed before its first checkpoint starts over
        started_only = config.resume and not any(
            (out / n).exists() for n in ("adapter", "model", "best"))
        _replace_earlier_run(out, config.overwrite or started_only, rank)
    else:
        run = loaded
    start_step = run.step
    if rank == 0:
        _start_outputs(out, config, run.step, train_set.stats)
    if rank == 0:
        _describe_run(model, config, plan, device, log.precision, start_step)
    forward = CompiledLoss(model, config.max_seq_len) if config.compile else model
    if rank == 0:
        _print_memory_estimate(model, config, amp_dtype, device)
    stop = min(plan.total_steps, config.stop_after or plan.total_steps)
    log.start(run.step, plan.total_steps)
    result_losses: list[tuple[int, float]] = []
    evals: list[dict[str, float]] = []
    tokens = 0

    model.train()
    for step in range(run.step, stop):
        lr = lr_at(step, config, plan.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_step_seed(config.seed, step, rank))  # dropout: resumable, per rank
        micro_batches, trained, step_tokens = plan.batches(step)
        # load_jsonl keeps no row without a trained token, but a hand-built dataset can give a
        # global batch with none: its loss is then 0 (the model's mean over no token), not 0/0,
        # on every rank alike (trained is the global batch's count), and the step goes on.
        trained = max(trained, 1)
        step_loss = torch.zeros((), device=device)
        for batch in micro_batches:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = _run(forward, batch)
            # Token-weighted: the sum over all micro-batches and ranks is the global-batch mean.
            loss = (output.loss * (batch.trained_tokens / trained)
                    + output.aux_loss / (len(micro_batches) * world))
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        step_loss = _sync_gradients(params, step_loss, world)
        finite = _unscale_and_clip(params, step_loss, optimizer, scaler, config.grad_clip)
        if finite:
            run.bad_in_a_row = 0
            if scaler:
                scaler.step(optimizer)
            else:
                optimizer.step()
        else:
            run.skipped += 1
            run.bad_in_a_row += 1
            _stop_if_too_many_bad(run, step, config.max_bad_steps)
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run.step = step + 1
        tokens += step_tokens

        logged = log.step(run.step, step_loss if finite else None, lr, step_tokens, run.skipped,
                          force=run.step == stop or run.step % config.log_every == 0)
        result_losses += logged
        if eval_set is not None and config.eval_every and run.step % config.eval_every == 0:
            evals.append(_evaluate_and_keep_best(model, eval_set, config, run, rank, world,
                                                 device, amp_dtype, log))
        if config.save_every and run.step % config.save_every == 0 and run.step != stop:
            save_checkpoint(out / CHECKPOINTS, model, optimizer, scaler, config, plan, run, rank)

    if rank == 0:
        peak, what = measured_peak(device)
        print(f"memory: measured peak {peak / 2**30:.2f} GiB ({what})", file=sys.stderr)
    finished = run.step == plan.total_steps  # not a stop_after: its resume evaluates later
    if eval_set is not None and finished and (not evals or evals[-1]["step"] != run.step):
        evals.append(_evaluate_and_keep_best(model, eval_set, config, run, rank, world, device,
                                             amp_dtype, log))
    checkpoint = save_checkpoint(out / CHECKPOINTS, model, optimizer, scaler, config, plan, run,
                                 rank)
    output_dir = _save_weights(model, out / ("model" if config.full else "adapter"), config, rank)
    if rank == 0:
        _plot(out)
    best = out / "best"
    return TrainResult(
        steps=run.step, total_steps=plan.total_steps, losses=result_losses, evals=evals,
        best_eval_loss=run.best_eval_loss, skipped_steps=run.skipped, tokens=tokens,
        seconds=time.perf_counter() - started, output_dir=output_dir,
        best_dir=best if rank == 0 and best.exists() else None, checkpoint_dir=checkpoint,
        data_stats=train_set.stats, start_step=start_step,
    )


# ---------------------------------------------------------------------------------------------
# Schedule, precision, distribution
# ---------------------------------------------------------------------------------------------


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
    """The autocast dtype for ``TrainConfig.dtype`` on ``device``; None means float32.

    Raises:
        ValueError: float16 off CUDA (its GradScaler needs CUDA), bfloat16 on a device
            without bf16 autocast.
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if name == "float16" and device.type != "cuda":
        raise ConfigError("dtype float16 needs CUDA (for its GradScaler); on CPU use bfloat16 "
                         "or float32")
    if name == "bfloat16" and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"dtype bfloat16: no autocast on {device.type}; use float32")
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _start_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def _broadcast(params: list[nn.Parameter], world: int) -> None:
    """Start every rank from rank 0's trainable weights."""
    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def _sync_gradients(params: list[nn.Parameter], step_loss: torch.Tensor,
                    world: int) -> torch.Tensor:
    """Sum the trainable gradients (and the step loss) over all processes; returns the loss.

    This is DDP's gradient all-reduce done once per optimizer step on one flat buffer, instead of
    DDP's per-bucket hooks: accumulation needs no ``no_sync``, and a parameter unused in a step
    (an MoE expert no token was routed to) is a zero gradient, where DDP would need
    ``find_unused_parameters``.
    """
    if world == 1:
        return step_loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [step_loss.reshape(1).float()])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset: offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return flat[-1]


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


def _stop_if_too_many_bad(run: _RunState, step: int, limit: int) -> None:
    if run.bad_in_a_row >= limit:
        raise TrainError(
            f"stopped at step {step + 1}: {run.bad_in_a_row} steps in a row had a non-finite "
            f"loss or gradient (skipped, nothing saved from them); lower lr, use dtype float32, "
            f"or check the data"
        )


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
    estimate = estimate_memory(model, config.batch_size, config.max_seq_len,
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


def _datasets(data: Tokenizer | JsonlDataset, eval_data: JsonlDataset | None,
              config: TrainConfig) -> tuple[JsonlDataset, JsonlDataset | None]:
    if isinstance(data, JsonlDataset):
        return data, eval_data
    if config.data is None:
        raise ConfigError("TrainConfig.data: the training jsonl is needed when train() is given "
                         "a tokenizer")
    train_set = load_jsonl(config.data, data, config.max_seq_len, skip_bad=config.skip_bad,
                           pack=config.pack and not config.replay)
    if config.replay:
        train_set = _with_replay(train_set, data, config)
    eval_set = None
    if config.eval_data is not None:
        eval_set = load_jsonl(config.eval_data, data, config.max_seq_len,
                              skip_bad=config.skip_bad)
    return train_set, eval_set


def _with_replay(train_set: JsonlDataset, tokenizer: Tokenizer, config: TrainConfig
                 ) -> JsonlDataset:
    """The training rows plus replay_ratio x as many rows of config.replay, drawn in a seeded
    order (cycled when the replay file is the smaller), then packed if asked."""
    replay = load_jsonl(config.replay, tokenizer, config.max_seq_len, skip_bad=config.skip_bad)
    wanted = round(config.replay_ratio * len(train_set))
    order = list(range(len(replay)))
    random.Random(f"minilora-replay:{config.seed}").shuffle(order)
    picked = [replay.samples[order[i % len(order)]] for i in range(wanted)]
    samples = train_set.samples + picked
    stats = train_set.stats
    stats.formats.update(replay.stats.formats)
    if config.pack:
        samples = pack_samples(samples, config.max_seq_len)
    print(f"data: replay {len(picked)} rows of {config.replay} beside {len(train_set)} training "
          "rows", file=sys.stderr)
    return JsonlDataset(samples, pad_id=train_set.pad_id, max_seq_len=config.max_seq_len,
                        path=train_set.path, packed=config.pack, stats=stats)


class _BatchPlan:
    """Which samples each process takes at each step.

    Step s of epoch e = s // steps_per_epoch takes global batch s % steps_per_epoch of
    ``batch_indices(n, G, seed, e)``, G = batch_size x accumulation_steps x world. Micro-batch j
    of rank r is its slice [(j W + r) B, (j W + r + 1) B): the union over ranks of micro-batch j
    is micro-batch j of one process with batch_size W x B.
    """

    def __init__(self, dataset: JsonlDataset, config: TrainConfig, rank: int, world: int) -> None:
        self.dataset = dataset
        self.config = config
        self.rank, self.world = rank, world
        self.global_batch = config.batch_size * config.accumulation_steps * world
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{dataset.path or 'the dataset'} has {len(dataset)} rows, fewer than one global "
                f"batch of {self.global_batch} (batch_size x accumulation_steps x processes); "
                "lower batch_size or accumulation_steps"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self._trained = [s.trained_tokens for s in dataset.samples]
        self._lengths = [len(s.input_ids) for s in dataset.samples]
        self._content = _content_sha256(dataset)
        self._epoch = -1
        self._order: list[list[int]] = []

    def position(self, step: int) -> dict[str, int]:
        """The data position before ``step``: what a checkpoint records."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch,
                "rows": len(self.dataset), "tokens": sum(self._lengths),
                "global_batch": self.global_batch, "sha256": self._content}

    def batches(self, step: int) -> tuple[list[Any], int, int]:
        """(this rank's micro-batches, trained tokens and tokens of the whole global batch)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = batch_indices(len(self.dataset), self.global_batch,
                                        seed=self.config.seed, epoch=epoch)
            self._epoch = epoch
        rows = self._order[index]
        b = self.config.batch_size
        starts = [(j * self.world + self.rank) * b for j in range(self.config.accumulation_steps)]
        micro = [self.dataset.collate(rows[start: start + b]) for start in starts]
        return (micro, sum(self._trained[i] for i in rows), sum(self._lengths[i] for i in rows))


def _check_vocab(dataset: JsonlDataset | None, model: nn.Module) -> None:
    """Every token id has a row in the model's embedding: a tokenizer larger than the model
    would otherwise fail with an IndexError part-way through a run."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = (getter() if callable(getter)
                 else getattr(getattr(model, "model", None), "embed_tokens", None))
    if dataset is None or not isinstance(embedding, nn.Embedding) or not dataset.samples:
        return
    vocab = embedding.num_embeddings
    for row, sample in enumerate(dataset.samples):
        if sample.input_ids and (max(sample.input_ids) >= vocab or min(sample.input_ids) < 0):
            bad = max(sample.input_ids) if max(sample.input_ids) >= vocab else min(
                sample.input_ids)
            raise DataError(dataset.path or "the dataset",
                            f"sample {row + 1} holds token id {bad}, outside the model's "
                            f"vocabulary (0 .. {vocab - 1}); the tokenizer does not belong to "
                            "this model")


def _content_sha256(dataset: JsonlDataset) -> str:
    """A hash of what the model is trained on, row by row in file order: the token ids and the
    labels. Other data of the same size (lines shuffled, digits swapped) gives another hash."""
    digest = hashlib.sha256()
    for sample in dataset.samples:
        digest.update(array.array("q", sample.input_ids).tobytes())
        digest.update(b"|")
        digest.update(array.array("q", sample.labels).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


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
    _check_vocab(dataset, model)
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


def _evaluate_and_keep_best(model: nn.Module, eval_set: JsonlDataset, config: TrainConfig,
                            run: _RunState, rank: int, world: int, device: torch.device,
                            amp_dtype: torch.dtype | None, log: _Log) -> dict[str, float]:
    record = {"step": run.step, **evaluate(model, eval_set, config.batch_size, device=device,
                                           amp_dtype=amp_dtype, rank=rank, world=world)}
    log.eval(record)
    if run.best_eval_loss is None or record["eval_loss"] < run.best_eval_loss:
        run.best_eval_loss = record["eval_loss"]
        _save_weights(model, Path(config.out_dir) / "best", config, rank)
    return record


# ---------------------------------------------------------------------------------------------
# Saving: weights, checkpoints, logs
# ---------------------------------------------------------------------------------------------


@dataclass
class _RunState:
    step: int = 0  # optimizer steps done
    skipped: int = 0  # non-finite steps skipped
    bad_in_a_row: int = 0
    best_eval_loss: float | None = None


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to save NaN / inf weights, and weights that diverged (an lr far too high keeps the
    loss finite while the weights grow without bound: the adapter then answers nothing)."""
    bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainError(f"refusing to save non-finite weights: {bad[:5]}")
    sizes = {n: float(t.detach().abs().max()) for n, t in tensors.items() if t.numel()}
    huge = sorted((n for n, v in sizes.items() if v > MAX_TRAINED_WEIGHT), key=sizes.get,
                  reverse=True)
    if huge:
        raise TrainError(f"refusing to save weights that diverged (lower lr; the checkpoint "
                         f"before is kept): largest magnitude {sizes[huge[0]]:.3g} > "
                         f"{MAX_TRAINED_WEIGHT:g} in {huge[:3]}")


def _save_weights(model: nn.Module, folder: Path, config: TrainConfig, rank: int) -> Path | None:
    """The adapter (or, with full=True, the whole model) into ``folder``; rank 0 only."""
    if rank != 0:
        return None
    _check_finite(_trainable(model))
    try:
        if config.full:
            save_model(model, folder)
        else:
            save_adapter(model, folder, base_model_name_or_path=config.model)
    except OSError as err:  # a full disk, say: an fsync error names no file, so name the folder
        raise OSError(err.errno, f"cannot write {folder}: {err.strerror or err}") from err
    return folder


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Any, config: TrainConfig, plan: _BatchPlan, run: _RunState,
                    rank: int = 0) -> Path | None:
    """Write ``folder/step-NNNNNNNN/`` and drop the older checkpoints; rank 0 only.

    ``trainable.safetensors`` holds the trainable weights; ``state.pt`` the optimizer, scaler,
    RNG states, data position, counters and config as plain tensors, numbers, strings, lists and
    dicts (read back with ``torch.load(weights_only=True)``). Both are written into a temporary
    folder, fsynced, and the folder renamed into place: a checkpoint folder is complete or absent.

    Returns:
        The checkpoint folder (None off rank 0).
    """
    if rank != 0:
        return None
    final = folder / f"step-{run.step:08d}"
    if final.exists():  # written earlier by this same run at this same step (resume is exact)
        _drop_older_checkpoints(folder, final)
        return final
    weights = {n: t.detach().cpu().contiguous() for n, t in _trainable(model).items()}
    _check_finite(weights)
    blob = safetensors_save(weights, metadata={"format": "pt", "step": str(run.step)})
    rng = random.getstate()
    state = {
        "format": _FORMAT,
        "step": run.step,
        "total_steps": plan.total_steps,
        "world_size": plan.world,
        "config": config.to_dict(),
        "data": plan.position(run.step),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": {"version": rng[0], "state": list(rng[1]), "gauss_next": rng[2]},
        },
        "skipped": run.skipped,
        "bad_in_a_row": run.bad_in_a_row,
        "best_eval_loss": run.best_eval_loss,
        "fingerprint": None if config.full else base_fingerprint(model),
        "trainable_sha256": hashlib.sha256(blob).hexdigest(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: a full disk is then an OSError of the write below
    files = {"trainable.safetensors": blob, "state.pt": buffer.getvalue()}
    manifest = {"format": _FORMAT, "step": run.step,
                "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, data in files.items():
            atomic_write(tmp / name, data)
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last
        os.replace(tmp, final)
    except BaseException as err:  # a full disk, say: the previous checkpoint stays the latest
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        kept = latest_checkpoint(folder)
        what = f"{kept} is kept" if kept else "there is no earlier checkpoint"
        raise OSError(err.errno, f"cannot write checkpoint {final}: {err.strerror or err}; "
                      f"{what}") from err
    fsync_dir(folder)
    _drop_older_checkpoints(folder, final)
    return final


def _drop_older_checkpoints(folder: Path, final: Path) -> None:
    """Remove the checkpoints before ``final`` and the temporary folders of torn writes."""
    for old in folder.iterdir():
        if old != final and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (temporary folders are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.is_dir())
    return done[-1] if done else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: Any, config: TrainConfig, plan: _BatchPlan) -> _RunState | None:
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
    files = verified_checkpoint_files(path)
    blob = files["trainable.safetensors"]
    try:
        state = torch.load(io.BytesIO(files["state.pt"]), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated file, ...
        raise CheckpointError(f"{path}: cannot read the checkpoint, damaged or not minilora's "
                              f"({torch_load_reason(err)})") from None
    _check_state(path, state)
    _check_same_run(path, state, config, plan)
    if hashlib.sha256(blob).hexdigest() != state["trainable_sha256"]:
        raise CheckpointError(f"{path}/trainable.safetensors: damaged (checksum mismatch)")
    if not config.full and state["fingerprint"] != base_fingerprint(model):
        raise CheckpointError(f"{path}: written for another base model (fingerprint differs)")
    _load_trainable(path, model, safetensors_load(blob))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    return _RunState(step=state["step"], skipped=state["skipped"],
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
                              "another out_dir") from None
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
    "data": dict, "optimizer": dict, "scaler": (dict, type(None)), "rng": dict, "skipped": int,
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
    if state["format"] != _FORMAT:
        raise CheckpointError(f"{path}/state.pt: checkpoint format {state['format']}, this "
                              f"minilora reads format {_FORMAT}")
    rng = state["rng"]
    if not (isinstance(rng.get("torch"), torch.Tensor) and isinstance(rng.get("cuda"), list)
            and isinstance(rng.get("python"), dict)):
        raise CheckpointError(f"{path}/state.pt: field 'rng': not minilora's RNG states")


def _check_same_run(path: Path, state: dict, config: TrainConfig, plan: _BatchPlan) -> None:
    saved, now = state["config"], config.to_dict()
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
             if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if state["world_size"] != plan.world:
        diffs.append(f"processes: {state['world_size']} in the checkpoint, {plan.world} now")
    saved_data, data_now = state["data"], plan.position(state["step"])
    diffs += [f"data.{k}: {saved_data.get(k)} in the checkpoint, {data_now[k]} now"
              for k in data_now if saved_data.get(k) != data_now[k]]
    if diffs:
        raise CheckpointError(
            f"{path} was written by a different run; refusing to resume: " + "; ".join(diffs)
            + ". Resume with the same settings, or train into a new out_dir."
        )


def _load_trainable(path: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    shapes = [n for n in params if n in weights and weights[n].shape != params[n].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}/trainable.safetensors does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, shape {shapes[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


# What train writes into out_dir; anything else there is the user's and is never touched.
_RUN_OUTPUTS = ("adapter", "model", "best", CHECKPOINTS, "metrics.jsonl", "loss.png",
                "config.json")


def _claim_out(config: TrainConfig, rank: int) -> FolderLock | None:
    """Rank 0 checks out_dir and locks it for this run; returns the lock (None off rank 0).

    Raises:
        OutputError: out_dir is or holds an input, holds files that are not a run's, or another
            process trains into it.
        OSError: out_dir cannot be created.
    """
    if rank != 0:
        return None
    out = Path(config.out_dir)
    # Only data that is a file: a folder given as data is refused as data, by load_jsonl.
    inputs = {k: p for k, p in (("data", config.data), ("eval_data", config.eval_data))
              if p is not None and Path(p).is_file()}
    check_not_an_input(out, inputs, "out_dir (--out)")
    check_own_folder(out, _RUN_OUTPUTS, "train", "out_dir (--out)")
    try:
        return FolderLock(out, "train").acquire()
    except OSError as err:
        raise OSError(err.errno, f"cannot write the output folder {out}: "
                      f"{err.strerror or err}; choose another out_dir (--out)") from None


def _replace_earlier_run(out: Path, overwrite: bool, rank: int) -> None:
    """A fresh run into a folder that holds an earlier run: refused unless ``overwrite``.

    An unfinished run is named as such (--resume continues it). With ``overwrite`` the earlier
    outputs are removed before this run writes anything, so nothing of that run is left beside
    this run's config.json; save_checkpoint would otherwise take a stale step folder for ours.
    """
    latest = latest_checkpoint(out / CHECKPOINTS)
    if latest is not None and not overwrite and _unfinished(latest):
        raise CheckpointError(
            f"{latest} holds an unfinished run: pass resume=True (--resume) to continue it, or "
            "train into another out_dir"
        )
    earlier = [n for n in ("adapter", "model", "best", CHECKPOINTS, "metrics.jsonl")
               if (out / n).exists()]
    if earlier and not overwrite:
        raise OutputError(f"{out} holds an earlier run ({', '.join(earlier)}): pass "
                          "overwrite=True (--overwrite) to replace it, or train into another "
                          "out_dir")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 removes or writes anything
    if rank == 0:
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _unfinished(checkpoint: Path) -> bool:
    try:
        state = torch.load(io.BytesIO(verified_checkpoint_files(checkpoint)["state.pt"]),
                           map_location="cpu", weights_only=True)
        return state["step"] < state["total_steps"]
    except Exception:  # damaged or not minilora's: never replaced silently
        return True


def _start_outputs(out: Path, config: TrainConfig, step: int, stats: DataStats) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        config.save_json(out / "config.json")
    except OSError as err:
        raise OSError(err.errno, f"cannot write the output folder {out}: "
                      f"{err.strerror or err}; choose another out_dir (--out)") from None
    metrics = out / "metrics.jsonl"
    # Keep what the checkpoint covers: a crashed run logged steps that will be run again.
    kept = []
    if step and metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by the crash
    atomic_write(metrics, "".join(kept))
    for file, found in stats.formats.items():
        kinds = ", ".join(f"{kind} ({n} records)" for kind, n in found.items())
        print(f"data: {file}: {kinds or 'no records'}", file=sys.stderr)
    print(f"data: {stats.samples} samples ({stats.trained_tokens} trained tokens); dropped "
          f"{stats.dropped_untrained} with nothing to train, truncated {stats.truncated}, "
          f"skipped {stats.skipped_bad} bad lines", file=sys.stderr)


class _Log:
    """metrics.jsonl, the progress bar (a TTY) or log lines (otherwise); rank 0 only."""

    def __init__(self, out: Path, rank: int) -> None:
        self.active = rank == 0
        self.path = out / "metrics.jsonl"
        self.bar: tqdm | None = None
        self.precision = ""  # the precision in words, for the run's opening block

    def start(self, step: int, total: int) -> None:
        """Show the bar from ``step`` of ``total`` and start counting."""
        self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                        disable=not (self.active and sys.stderr.isatty()))
        self.loss_sum = torch.zeros(())
        self.steps = 0  # finite steps since the last log
        self.tokens = 0
        self.since = time.perf_counter()
        self.total = total

    def step(self, step: int, loss: torch.Tensor | None, lr: float, tokens: int, skipped: int,
             *, force: bool) -> list[tuple[int, float]]:
        """Count a step; every log_every steps (``force``) read the loss: the only .item()."""
        self.bar.update(1)
        if loss is not None:
            self.loss_sum = self.loss_sum.to(loss.device) + loss
            self.steps += 1
        self.tokens += tokens
        if not force:
            return []
        mean = float(self.loss_sum / max(self.steps, 1)) if self.steps else float("nan")
        now = time.perf_counter()
        record = {"step": step, "loss": mean, "lr": lr,
                  "tokens_per_s": self.tokens / max(now - self.since, 1e-9), "skipped": skipped}
        self.loss_sum, self.steps, self.tokens, self.since = torch.zeros(()), 0, 0, now
        self._write(record)
        if self.bar.disable and self.active:
            print(f"step {step}/{self.total} loss {mean:.4f} lr {lr:.2e} "
                  f"tok/s {record['tokens_per_s']:.0f}", file=sys.stderr)
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        return [(step, mean)]

    def eval(self, record: dict[str, float]) -> None:
        self._write(record)
        if self.active:
            self.bar.write(f"eval at step {record['step']}: loss {record['eval_loss']:.4f} "
                           f"ppl {record['eval_ppl']:.2f}", file=sys.stderr)

    def _write(self, record: dict[str, float]) -> None:
        # null, not NaN: a window of skipped steps has no loss, and NaN is not JSON
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (train and eval loss by step); a note without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("loss.png skipped: matplotlib is not installed (pip install 'minilora[plot]')",
              file=sys.stderr)
        return None
    records = [json.loads(line) for line in
               (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    train_points = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    eval_points = [(r["step"], r["eval_loss"]) for r in records
                   if r.get("eval_loss") is not None]
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for points, label in ((train_points, "train"), (eval_points, "eval")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 50 else "")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=100)
    return out / "loss.png"
