"""Data-parallel training under torchrun: the process group, rank 0's weights on every rank, and
one gradient all-reduce per optimizer step. At WORLD_SIZE 1 each is a no-op. Sharded training
(FSDP) is fsdp.py's; it starts its process group here too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from minilora.core.errors import ConfigError
from minilora.core.tensor_checks import resolve_device

# What torchrun sets in each process beside WORLD_SIZE; without them the process group cannot
# start (torch raises a ValueError deep in its rendezvous).
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: str, minimum: int) -> int:
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"environment variable {name}={text!r}: expected an integer >= "
                          f"{minimum} (torchrun sets it; unset it to train in one process)")
    return value


def start_distributed(device_name: str, group: bool = False
                      ) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group).

    Args:
        device_name: the config's device ("auto": cuda:LOCAL_RANK with CUDA, else cpu).
        group: start the process group at WORLD_SIZE 1 too (FSDP shards over a group of one).

    Raises:
        ConfigError: WORLD_SIZE, RANK or LOCAL_RANK is not a number in range, or WORLD_SIZE > 1
            without the other variables torchrun sets (the command was not started by it).
    """
    world = _env_int("WORLD_SIZE", "1", 1)
    local_rank = _env_int("LOCAL_RANK", "0", 0)
    if world > 1 and not dist.is_initialized():
        missing = [name for name in _TORCHRUN_VARIABLES if not os.environ.get(name)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"environment variable WORLD_SIZE={world} asks for {world} "
                              f"processes, but {', '.join(missing)} {verb} not set; start "
                              f"multi-process training with torchrun --nproc-per-node {world} "
                              "-m minilora train ..., or unset WORLD_SIZE")
        rank = _env_int("RANK", "0", 0)
        if rank >= world:
            raise ConfigError(f"environment variable RANK={rank}: expected a rank below "
                              f"WORLD_SIZE={world}")
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and not group:
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
                    world: int, sharded: bool = False) -> torch.Tensor:
    """Sum the trainable gradients (and the step loss) over all processes; returns the loss.

    This is DDP's gradient all-reduce done once per optimizer step on one flat buffer, instead of
    DDP's per-bucket hooks: accumulation needs no ``no_sync``, and a parameter unused in a step
    on some process needs no ``find_unused_parameters``. A parameter that no process gave a
    gradient keeps none, as in one process (AdamW skips it; a zero gradient would still move it
    through momentum and weight decay).

    With ``sharded`` (FSDP) backward has already summed each gradient into its shards: only
    the loss is summed here.
    """
    if sharded:
        dist.all_reduce(step_loss)
        return step_loss
    if world == 1:
        return step_loss
    had = torch.tensor([float(p.grad is not None) for p in params], device=step_loss.device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [had, step_loss.reshape(1).float()])
    dist.all_reduce(flat)
    had_any = flat[-1 - len(params):-1].tolist()
    offset = 0
    for p, g, anyone in zip(params, grads, had_any, strict=True):
        p.grad = flat[offset: offset + g.numel()].view_as(g).to(g.dtype) if anyone else None
        offset += g.numel()
    return flat[-1]
