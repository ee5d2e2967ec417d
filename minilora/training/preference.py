"""Preference tuning: the DPO and SimPO losses on pairs of a chosen and a rejected answer.

A method here is a loss and a data format beside the one training loop (loop.py), not a second
loop: the loop asks ``PreferenceLoss`` for each micro-batch's loss and its reward sums, and
everything else (accumulation, clipping, resume, checkpoints) is the loop's own.

- DPO (Rafailov et al. 2023): the reward of an answer is ``beta * (log pi(y) - log ref(y))``,
  log-probabilities summed over the answer's tokens; the loss is ``-log sigmoid(r_chosen -
  r_rejected)``. With label smoothing eps (conservative DPO: eps of the pairs assumed flipped)
  it is ``-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)``. IPO (Azar et al. 2023) squares
  instead: ``(h - 1 / (2 beta))**2``, h the difference of the per-token mean log-ratios (TRL's
  normalisation, which its authors confirmed).
- The reference is the same model with the adapter off (``disabled``), run under no_grad: no
  second copy of the weights. Started from an SFT adapter (``from_adapter``), the reference is
  that adapter, loaded frozen under the name REFERENCE, and the trained adapter a copy of it.
- SimPO (Meng et al. 2024), the reference-free method: the reward is ``beta / |y| * log pi(y)``
  (a per-token mean, so a long answer is not favoured) and the loss ``-log sigmoid(r_chosen -
  r_rejected - gamma)``, gamma a target margin. Chosen over ORPO because it is the same
  sigmoid-of-a-margin as DPO (label smoothing and the reward metrics carry over unchanged), it
  needs no reference pass (the cheapest step), and it adds no SFT term that would make the
  result depend on how much of the data is SFT-like (ORPO's is a weighted sum of an SFT loss and
  an odds-ratio term: two objectives to balance instead of one margin).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.adapters.folder import load_adapter
from minilora.core.errors import AdapterError, ConfigError, FingerprintMismatch
from minilora.data.preference import PairDataset
from minilora.data.sft import Batch
from minilora.lora.injection import disabled, inject_lora
from minilora.lora.layer import lora_modules
from minilora.lora.named import active_adapters, set_active
from minilora.training.config import TrainConfig

REFERENCE = "reference"  # the frozen SFT adapter's name, with from_adapter
# The reward sums a step adds up (a mean over the global batch's pairs once divided).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


def sequence_log_probs(model: nn.Module, input_ids: Tensor, labels: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """Each row's log-probability of its counted labels, summed, and the MoE aux loss.

    minilora's CausalLM computes it through its chunked head (the logits never exist whole);
    another causal LM (a transformers model) is asked for its logits.

    Args:
        model: the model.
        input_ids: (B, T) right-padded token ids.
        labels: (B, T) aligned with input_ids (the model shifts); -100 where not counted.

    Returns:
        ((B,) float32 sums, 0-dim aux loss).
    """
    if hasattr(model, "sequence_log_probs"):
        return cast(Any, model).sequence_log_probs(input_ids, labels)
    output = model(input_ids)
    targets = labels[:, 1:]  # (B, T-1)
    logps = output.logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    picked = logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    aux = getattr(output, "aux_loss", None)
    return (picked * (targets != -100)).sum(-1), (aux if aux is not None else
                                                   picked.new_zeros(()))


def preference_losses(config: TrainConfig, chosen: Tensor, rejected: Tensor,
                      ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                      chosen_tokens: Tensor, rejected_tokens: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and rewards of the config's method.

    Args:
        config: method ("dpo" or "simpo"), beta, dpo_loss, label_smoothing, simpo_gamma.
        chosen, rejected: (P,) the policy's summed answer log-probs.
        ref_chosen, ref_rejected: (P,) the reference's (dpo), None for simpo.
        chosen_tokens, rejected_tokens: (P,) each answer's counted tokens.

    Returns:
        ((P,) losses, (P,) chosen rewards, (P,) rejected rewards); the rewards are detached.
    """
    beta, eps = config.preference_beta(), config.label_smoothing
    if config.method == "simpo":
        chosen_reward = beta * chosen / chosen_tokens.clamp(min=1)
        rejected_reward = beta * rejected / rejected_tokens.clamp(min=1)
        margin = chosen_reward - rejected_reward - config.simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        return losses, chosen_reward.detach(), rejected_reward.detach()
    assert ref_chosen is not None and ref_rejected is not None  # dpo has a reference
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if config.dpo_loss == "ipo":
        h = (chosen_ratio / chosen_tokens.clamp(min=1)
             - rejected_ratio / rejected_tokens.clamp(min=1))
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        margin = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class PreferenceLoss:
    """A micro-batch's preference loss: the policy forward (chosen and rejected rows as one
    batch), the reference forward (dpo, no_grad), the method's loss.

    Args:
        config: the run's settings.
        reference: the adapter that is the reference (REFERENCE with from_adapter), None for
            the base with every adapter off.
    """

    def __init__(self, config: TrainConfig, reference: str | None = None) -> None:
        self.config = config
        self.reference = reference

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(summed loss over the batch's pairs, aux loss, (4,) reward sums in METRICS order).

        Batch rows: the P chosen rows, then the P rejected rows of the same pairs.
        """
        logps, aux = sequence_log_probs(model, batch.input_ids, batch.labels)  # (2P,)
        ref = None
        if self.config.method == "dpo":
            ref = self.reference_log_probs(model, batch)
        losses, chosen_r, rejected_r = self._losses(batch, logps, ref)
        sums = torch.stack([chosen_r.sum(), rejected_r.sum(),
                            (chosen_r > rejected_r).float().sum(), (chosen_r - rejected_r).sum()])
        return losses.sum(), aux, sums

    @torch.no_grad()
    def reference_log_probs(self, model: nn.Module, batch: Batch) -> Tensor:
        """(2P,) the reference's summed answer log-probs: the same model, adapter off (or the
        reference adapter on), no graph kept."""
        with self._as_reference(model):
            return sequence_log_probs(model, batch.input_ids, batch.labels)[0]

    @contextlib.contextmanager
    def _as_reference(self, model: nn.Module) -> Iterator[None]:
        if self.reference is None:
            with disabled(model):
                yield
            return
        active = active_adapters(model)
        set_active(model, [self.reference])
        try:
            yield
        finally:
            set_active(model, active)

    def _losses(self, batch: Batch, logps: Tensor, ref: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        P = logps.shape[0] // 2
        counted = (batch.labels[:, 1:] != -100).sum(-1).to(logps.dtype)  # (2P,)
        ref_c, ref_r = (None, None) if ref is None else (ref[:P], ref[P:])
        return preference_losses(self.config, logps[:P], logps[P:], ref_c, ref_r, counted[:P],
                                 counted[P:])


def start_from_adapter(model: nn.Module, config: TrainConfig) -> str | None:
    """Loads config.from_adapter to train from: for dpo frozen as the reference (REFERENCE)
    with a trainable copy of it as the active adapter ("default"), TRL's layout; for simpo as
    the adapter trained. Returns the reference adapter's name (None for simpo).

    Raises:
        ConfigError: the model already has adapters.
        AdapterError: an unreadable adapter, or one made for another base.
    """
    if lora_modules(model):
        raise ConfigError("{from_adapter}: the model already holds LoRA adapters; give the "
                          "plain base", fields={"from_adapter": "from_adapter"})
    assert config.from_adapter is not None  # called with from_adapter only
    path = Path(config.from_adapter)
    try:
        lora_config = load_adapter(model, path, name=REFERENCE if config.method == "dpo" else None)
    except FingerprintMismatch as err:  # no override here: a reference of another base is wrong
        raise AdapterError(f"{{from_adapter}}: {err.message}; start from an adapter trained on "
                           "this base, or give its own base as {model}",
                           fields={"from_adapter": "from_adapter", "model": "model"}) from None
    if config.method != "dpo":
        return None
    inject_lora(model, lora_config)  # "default", active alone
    with torch.no_grad():
        for _, m in lora_modules(model):
            if REFERENCE in m.lora_A:
                for theirs, ours in zip(m.adapter_parameters(REFERENCE),
                                        m.adapter_parameters("default"), strict=True):
                    ours.copy_(theirs)
    return REFERENCE


@torch.no_grad()
def evaluate_preference(model: nn.Module, dataset: PairDataset, loss: PreferenceLoss,
                        batch_size: int, *, device: torch.device, amp_dtype: torch.dtype | None,
                        rank: int = 0, world: int = 1) -> dict[str, float]:
    """The mean loss and rewards of ``model`` over held-out pairs.

    Returns:
        ``{"eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracy",
        "eval_rewards/margin", "eval_pairs"}``.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(6, dtype=torch.float64, device=device)  # loss, 4 rewards, pairs
    for start in range(rank * batch_size, len(dataset), batch_size * world):
        indices = range(start, min(start + batch_size, len(dataset)))
        batch = dataset.collate(indices).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            summed, _, sums = loss(model, batch)
        total[0] += summed.double()
        total[1:5] += sums.double()
        total[5] += len(indices)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    pairs = float(total[5].clamp(min=1))
    record = {"eval_loss": float(total[0]) / pairs}
    record.update({f"eval_{name}": float(total[1 + i]) / pairs for i, name in enumerate(METRICS)})
    record["eval_pairs"] = int(total[5])
    return record


def mean_metrics(sums: Tensor, pairs: int, world: int) -> Tensor:
    """A step's reward sums (this process's) as means over the global batch's pairs."""
    if world > 1:
        dist.all_reduce(sums)
    return sums / pairs
