"""What a run tells as it goes: config.json and metrics.jsonl in its folder, the progress bar (a
terminal) or log lines (otherwise), TensorBoard event files when asked, and loss.png at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from minilora.core.errors import MissingExtra, install_command
from minilora.core.files import atomic_write, parse_json
from minilora.data.sft import DataStats
from minilora.lora.layer import lora_modules
from minilora.lora.quantized_weight import stored_values
from minilora.training.config import TrainConfig
from minilora.training.datasets import BatchPlan
from minilora.training.preference import METRICS
from minilora.training.run_layout import RunLayout

# What a preference step reports beside its loss (training/preference.py's METRICS; this module
# imports no loss code, so the names are written here too, and a test holds them equal).
REWARD_METRICS = METRICS  # a preference step's mean rewards, in this order


def start_outputs(out: Path, config: TrainConfig, step: int, stats: DataStats) -> None:
    """Write config.json, keep the metrics.jsonl lines the checkpoint at ``step`` covers, and
    say what reading the data kept and dropped.

    Raises:
        OSError: out cannot be written (naming it and what to do).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        config.save_json(RunLayout(out).config)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the output folder {out}: "
                      f"{err.strerror or err}; choose another out_dir (--out)") from None
    metrics = RunLayout(out).metrics
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


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter (torch's, which writes with the tensorboard package).

    Raises:
        MissingExtra: the tensorboard package is not installed (names the extra).
    """
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; say so first)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtra("--log-to tensorboard", "tensorboard") from None
    return SummaryWriter


class RunLog:
    """metrics.jsonl, the progress bar (a TTY) or log lines (otherwise), and with
    ``log_to="tensorboard"`` the same scalars as TensorBoard events; rank 0 only."""

    def __init__(self, out: Path, rank: int, log_to: str | None = None) -> None:
        self.active = rank == 0
        self.path = RunLayout(out).metrics
        self.bar: tqdm | None = None
        self.precision = ""  # the precision in words, for the run's opening block
        self.log_to = log_to
        self.writer: Any = None
        if log_to == "tensorboard":
            require_tensorboard()  # before anything is written

    def start(self, step: int, total: int) -> None:
        """Show the bar from ``step`` of ``total`` and start counting."""
        if self.log_to == "tensorboard" and self.active:
            # purge_step: a resumed run drops the events of the steps it will run again, as
            # metrics.jsonl keeps only what the checkpoint covers
            self.writer = require_tensorboard()(str(self.path.parent / RunLayout.TENSORBOARD),
                                                purge_step=step + 1 if step else None)
        self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                        disable=not (self.active and sys.stderr.isatty()))
        self.loss_sum = torch.zeros(())
        self.reward_sum: torch.Tensor | None = None  # preference methods: METRICS' sums
        self.steps = 0  # finite steps since the last log
        self.tokens = 0
        self.since = time.perf_counter()
        self.total = total

    def step(self, step: int, loss: torch.Tensor | None, lr: float, tokens: int, skipped: int,
             *, force: bool, rewards: torch.Tensor | None = None) -> list[tuple[int, float]]:
        """Count a step; every log_every steps (``force``) read the loss: the only .item().

        ``rewards``: a preference step's mean rewards (training/preference.py's METRICS),
        averaged over the logged steps as the loss is and written beside it.
        """
        bar = self.bar
        assert bar is not None  # start() made it
        bar.update(1)
        if loss is not None:
            self.loss_sum = self.loss_sum.to(loss.device) + loss
            self.steps += 1
        if rewards is not None:
            self.reward_sum = rewards if self.reward_sum is None else self.reward_sum + rewards
        self.tokens += tokens
        if not force:
            return []
        mean = float(self.loss_sum / max(self.steps, 1)) if self.steps else float("nan")
        now = time.perf_counter()
        record = {"step": step, "loss": mean, "lr": lr,
                  "tokens_per_s": self.tokens / max(now - self.since, 1e-9), "skipped": skipped}
        shown = ""
        if self.reward_sum is not None:
            means = (self.reward_sum / max(self.steps, 1)).tolist()
            record.update(zip(REWARD_METRICS, means, strict=True))
            shown = (f" reward acc {record['rewards/accuracy']:.2f} margin "
                     f"{record['rewards/margin']:.3f}")
        self.loss_sum, self.steps, self.tokens, self.since = torch.zeros(()), 0, 0, now
        self.reward_sum = None
        self._write(record)
        if bar.disable and self.active:
            print(f"step {step}/{self.total} loss {mean:.4f}{shown} lr {lr:.2e} "
                  f"tok/s {record['tokens_per_s']:.0f}", file=sys.stderr)
        extra = {} if not shown else {"acc": f"{record['rewards/accuracy']:.2f}",
                                      "margin": f"{record['rewards/margin']:.3f}"}
        bar.set_postfix(loss=f"{mean:.4f}", **extra, lr=f"{lr:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}")
        return [(step, mean)]

    def eval(self, record: dict[str, float]) -> None:
        """Logs an evaluation record (step, eval_loss, eval_ppl, task/<name>, ...) to
        metrics.jsonl."""
        self._write(record)
        if not self.active:
            return
        assert self.bar is not None  # start() made it
        said = []
        if "eval_ppl" in record:
            said.append(f"loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}")
        elif "eval_loss" in record:  # a preference method's
            said.append(f"loss {record['eval_loss']:.4f} reward acc "
                        f"{record['eval_rewards/accuracy']:.2f} margin "
                        f"{record['eval_rewards/margin']:.3f}")
        said += [f"{k.removeprefix('task/')} {v:.1%}" for k, v in record.items()
                 if k.startswith("task/")]
        self.bar.write(f"eval at step {record['step']}: {', '.join(said)}", file=sys.stderr)

    def _write(self, record: dict[str, float]) -> None:
        # null, not NaN: a window of skipped steps has no loss, and NaN is not JSON
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(finite) + "\n")
        if self.writer is not None:
            for key, value in finite.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        """Closes the progress bar (the run ended, or stopped with an error)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_losses(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (train and eval loss by step, and task accuracy beside it when
    the run scored task files); a note without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"loss.png skipped: matplotlib is not installed ({install_command('plot')})",
              file=sys.stderr)
        return None
    records: list[Any] = []  # any JSON value: the dicts with a step are kept below
    for line in RunLayout(out).metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(parse_json(line))
        except ValueError:
            continue  # a line torn by a run killed before this one resumed
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
    train_points = [(r["step"], r["loss"]) for r in records
                    if isinstance(r.get("loss"), (int, float))]
    eval_points = [(r["step"], r["eval_loss"]) for r in records
                   if isinstance(r.get("eval_loss"), (int, float))]
    task_names = sorted({k for r in records for k in r if k.startswith("task/")})
    reward_series = [(name, [(r["step"], r[name]) for r in records
                             if isinstance(r.get(name), (int, float))])
                     for name in (*REWARD_METRICS, "eval_rewards/accuracy")]
    reward_series = [(name, points) for name, points in reward_series if points]
    panels = 1 + bool(task_names) + bool(reward_series)
    figure = Figure(figsize=(6 + 5 * (panels - 1), 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, panels, 1)
    for points, label in ((train_points, "train"), (eval_points, "eval")):
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="." if len(points) < 50 else "")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if task_names:  # what the run learns and what it keeps, as it trains
        tasks_ax = figure.add_subplot(1, panels, 2)
        for name in task_names:
            points = [(r["step"], 100 * r[name]) for r in records
                      if isinstance(r.get(name), (int, float))]
            tasks_ax.plot(*zip(*points, strict=True), label=name.removeprefix("task/"),
                          marker=".")
        tasks_ax.set_xlabel("step")
        tasks_ax.set_ylabel("task accuracy (%)")
        tasks_ax.set_ylim(-5, 105)
        tasks_ax.legend(fontsize="small")
    if reward_series:  # a preference run: what its implicit reward says, step by step
        rewards_ax = figure.add_subplot(1, panels, panels)
        for name, points in reward_series:
            rewards_ax.plot(*zip(*points, strict=True), label=name,
                            marker="." if len(points) < 50 else "")
        rewards_ax.set_xlabel("step")
        rewards_ax.set_ylabel("reward (accuracy: share of pairs)")
        rewards_ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(RunLayout(out).plot, dpi=100)
    return RunLayout(out).plot


def print_run_plan(model: nn.Module, config: TrainConfig, plan: BatchPlan, device: torch.device,
                  precision: str, start_step: int) -> None:
    """Prints one block before the first step: what will run, where, and how much."""
    # a 4-bit weight packs two values a byte: count the values it stands for, as unquantized
    total = sum(stored_values(p) for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = "every weight (full fine-tuning)" if config.full else (
        f"{len(lora_modules(model))} LoRA modules (rank {config.lora_r})")
    rows = sum(len(s.input_ids) for s in plan.dataset.samples) / max(len(plan.dataset), 1)
    steps = (f"{plan.total_steps} ({plan.steps_per_epoch} per epoch)" if not start_step
             else f"{plan.total_steps - start_step} left of {plan.total_steps}")
    lines = [
        f"device      {device}",
        f"precision   {precision}",
        f"threads     {torch.get_num_threads()} (intra-op)",
        f"parameters  {trained:,} trainable of {total:,} ({100 * trained / total:.2f}%)",
        f"adapted     {adapted}",
        f"steps       {steps}",
        f"per step    {plan.global_batch} {'rows' if config.method == 'sft' else 'pairs'}, "
        f"about {plan.global_batch * rows:,.0f} tokens",
    ]
    stats = getattr(plan.dataset, "stats", None)
    chats = stats is not None and any(f.get(k) for f in stats.formats.values()
                                      for k in ("chat", "sharegpt", "alpaca"))
    if chats and stats is not None and stats.template:  # what the conversations were rendered with
        lines.append(f"template    {stats.template}")
    print("\n".join("run: " + line for line in lines), file=sys.stderr)
