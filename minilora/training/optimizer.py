"""The optimizer of a run: AdamW over the trainable parameters, with LoRA+'s larger learning rate
for the B matrices when asked.

LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") trains B with
`ratio` times A's learning rate: with B starting at zero, a shared rate leaves B's updates too
small for features to move at wide widths. The groups are the ones PEFT's
`create_loraplus_optimizer` builds, so a run here and a run with PEFT's optimizer step alike:
A (and every other trainable weight) at `lr`; B and the one-dimensional parameters (DoRA's
magnitude) at `lr * ratio`; an embedding's A and B (minilora.lora.embedding) in a group of their
own at LORAPLUS_LR_EMBEDDING, PEFT's default `loraplus_lr_embedding`; the copies of
modules_to_save and the trainable token rows at `lr`, whatever their shape. Each group keeps
its ratio to `lr` under "lr_ratio", so the schedule scales every group alike (`set_lr`), as a
scheduler scales each of PEFT's groups from its own starting rate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.injection import extra_parameters
from minilora.lora.layer import lora_modules
from minilora.training.config import TrainConfig

# LoRA+'s learning rate for an embedding's A and B: PEFT's create_loraplus_optimizer default.
LORAPLUS_LR_EMBEDDING = 1e-6


def build_optimizer(model: nn.Module, params: list[nn.Parameter], config: TrainConfig
                    ) -> torch.optim.Optimizer:
    """AdamW over `params` (the trainable parameters of `model`), in LoRA+ groups when
    ``config.loraplus_lr_ratio`` is set.

    Fused where torch has the kernel: LoRA has two small tensors per adapted layer, and the
    unfused loop pays a dozen tiny ops for each of them.
    """
    groups = param_groups(model, params, config.lr, config.weight_decay, config.loraplus_lr_ratio)
    try:
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                                 fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4 on a CPU, or a device without the kernel
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def param_groups(model: nn.Module, params: list[nn.Parameter], lr: float, weight_decay: float,
                 ratio: float | None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one group at `lr`, or with a LoRA+ `ratio`, A's group
    at `lr`, an embedding's A and B at LORAPLUS_LR_EMBEDDING (PEFT's groups) and B's (with the
    1-D parameters) at ``lr * ratio``; a group with no parameters is left out. B is found by
    type (the ``lora_B`` modules of each LoRA layer), not by name."""
    if ratio is None:
        return [{"params": list(params), "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0}]
    embedding = {id(p) for _, m in lora_modules(model) if isinstance(m, LoRAEmbedding)
                 for p in m.parameters() if p is not m.weight}
    fast = {id(p) for _, m in lora_modules(model) for p in m.lora_B.parameters()}
    fast |= {id(p) for p in params if p.ndim == 1}
    # modules to save and trainable token rows learn at A's rate: LoRA+'s larger rate is for B,
    # which starts at zero; these start at the base's values. (PEFT's LoRA+ optimizer puts any
    # 1-D weight at B's rate, a copied norm's too; here only DoRA's magnitude goes there.)
    fast -= embedding | {id(p) for p in extra_parameters(model)}
    slow_group = [p for p in params if id(p) not in fast | embedding]
    fast_group = [p for p in params if id(p) in fast]
    embedding_group = [p for p in params if id(p) in embedding]
    groups = [{"params": slow_group, "lr": lr, "weight_decay": weight_decay, "lr_ratio": 1.0},
              {"params": embedding_group, "lr": LORAPLUS_LR_EMBEDDING,
               "weight_decay": weight_decay, "lr_ratio": LORAPLUS_LR_EMBEDDING / lr},
              {"params": fast_group, "lr": lr * ratio, "weight_decay": weight_decay,
               "lr_ratio": ratio}]
    return [g for g in groups if g["params"]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets the schedule's learning rate: each group at ``lr`` times its LoRA+ ratio."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
