"""Sharded data parallelism (PyTorch's FSDP2, ``fully_shard``) under torchrun.

With ``fsdp`` each process holds 1/N of every weight, the frozen base's and LoRA's alike, as
DTensor shards: each decoder block is gathered whole just before its forward (and again for its
backward) and freed after, and backward leaves each process the summed gradient of its own
shard. Nothing of the sharding is ours: this file wraps the blocks and the root with
``fully_shard`` and moves whole tensors in and out of the shards, so what is written (adapter
folder, checkpoint) is exactly what one process writes, and any number of processes reads it.

The step stays the loop's: the loss is the global batch's token-weighted mean summed over
ranks, so the gradients are summed (divide factor 1), not averaged.
"""

from __future__ import annotations

import os
from typing import Any, cast

import torch
from torch import nn

from minilora.core.errors import ConfigError
from minilora.core.tensor_checks import is_sharded
from minilora.lora.fingerprint import record_fingerprint_before_sharding

# The names a decoder's list of blocks goes by: minilora's and transformers' Llama/Qwen
# (model.layers), GPT-2 (transformer.h), others (blocks).
_BLOCK_LISTS = ("layers", "h", "blocks")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH = "torchrun --nproc_per_node 2 -m minilora train --fsdp ..."


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or set up as torchrun sets it up)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def check_launch(fsdp: bool) -> None:
    """Refuse ``fsdp`` in a process torchrun did not start (there is nothing to shard across).

    Raises:
        ConfigError: naming the command line that launches it.
    """
    if fsdp and not under_torchrun():
        raise ConfigError("{fsdp} shards the model across the processes torchrun starts; launch "
                          f"it as: {LAUNCH} (one node; see the README for several)",
                          fields={"fsdp": "TrainConfig.fsdp"})


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: the first ModuleList named one of ``_BLOCK_LISTS``.

    Raises:
        ConfigError: the model has none (it would be one shard group, gathered whole).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            return list(module)
    raise ConfigError(f"{{fsdp}}: {type(model).__name__} has no list of decoder blocks (a "
                      f"ModuleList named one of {list(_BLOCK_LISTS)}) to shard one by one",
                      fields={"fsdp": "TrainConfig.fsdp"})


def shard_model(model: nn.Module, device: torch.device, world: int) -> list[nn.Parameter]:
    """Shard ``model`` over the ``world`` processes: each decoder block, then the root (the
    embeddings, the final norm and the head).

    Every process must hold the same weights before (broadcast them first): each keeps its
    slice. The base fingerprint is recorded first, as no process holds the whole base after.

    Returns:
        The trainable parameters, now DTensors (the ones from before are no longer the
        model's: build the optimizer over these).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ConfigError(f"{{fsdp}} needs a newer PyTorch (FSDP2 with summed gradient "
                          f"reduction; 2.13 is tested), this is {torch.__version__}",
                          fields={"fsdp": "TrainConfig.fsdp"})
    record_fingerprint_before_sharding(model)
    mesh = init_device_mesh(device.type, (world,))
    wrapped = [*decoder_blocks(model), model]
    for module in wrapped:
        fully_shard(module, mesh=mesh)
    for shard in wrapped:
        fsdp_module: Any = shard  # an FSDPModule now: fully_shard added its methods
        # The loop's loss is already the global mean split over ranks: sum the gradients
        # (a plain SUM: gloo has no pre-multiplied sum, and a factor of 1 divides nothing).
        fsdp_module.set_gradient_divide_factor(1.0)
        fsdp_module.set_force_sum_reduction_for_comms(True)
        # A parameter no token of this rank used (an MoE expert) still joins the reduction,
        # as a zero gradient, or the ranks' collectives would not match.
        fsdp_module.set_reduce_scatter_unused_params(True, recurse=False)
    return [p for p in model.parameters() if p.requires_grad]


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor's shards gathered (a collective: every rank calls it, in the same
    order), a plain tensor as it is."""
    return cast(Any, t).full_tensor() if is_sharded(t) else t


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded state (AdamW's moments) gathered whole: the
    layout one process saves. A collective under FSDP (every rank calls it)."""
    saved = optimizer.state_dict()
    saved["state"] = {index: {k: whole(v) if isinstance(v, torch.Tensor) else v
                              for k, v in state.items()}
                      for index, state in saved["state"].items()}
    return saved


def load_whole_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``: this rank's slice when it is sharded
    (every rank holds ``value``, so nothing is sent)."""
    with torch.no_grad():
        param.copy_(_shard_like(param, value.to(param.dtype)))


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a whole state: keep each sharded parameter's
    states as its shards, as the optimizer's step needs them."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (is_sharded(p) and isinstance(value, torch.Tensor) and not is_sharded(value)
                        and value.shape == p.shape):
                    state[key] = _shard_like(p, value)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: its shards of the sharded ones (tied weights
    once)."""
    total = 0
    for p in model.parameters():
        local = cast(Any, p).to_local() if is_sharded(p) else p
        total += local.numel() * local.element_size()
    return total


def _shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if not is_sharded(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank cuts its own slice of the value it holds (no scatter).
    sharded: Any = param  # a DTensor
    return distribute_tensor(value.to(param.device), sharded.device_mesh, sharded.placements,
                             src_data_rank=None)
