"""Data-parallel training under torchrun: the process group, rank 0's weights on every rank, and
one gradient all-reduce per optimizer step. At WORLD_SIZE 1 each is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from minilora.tensor_checks import resolve_device


def start_distributed(device_name: str) -> tuple[int, int, torch.device, bool]:
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


def broadcast(params: list[nn.Parameter], world: int) -> None:
    """Start every rank from rank 0's trainable weights."""
    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def sync_gradients(params: list[nn.Parameter], step_loss: torch.Tensor,
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
