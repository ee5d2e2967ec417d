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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from minilora.core.errors import ConfigError, WeightsError
from minilora.core.tensor_checks import is_sharded, tensor_problems
from minilora.lora.fingerprint import (
    record_fingerprint_before_sharding,
    record_sharded_fingerprint,
)
from minilora.lora.layer import lora_modules
from minilora.lora.weight_hash import hash_weights
from minilora.model.state_files import BaseSlices

# The names a decoder's list of blocks goes by: minilora's and transformers' Llama/Qwen
# (model.layers), GPT-2 (transformer.h), others (blocks).
_BLOCK_LISTS = ("layers", "h", "blocks")
# The model's methods run in place of forward, which fully_shard's hooks must see: the
# preference losses' (training/preference.py sequence_log_probs).
_ENTRY_METHODS = ("sequence_log_probs",)
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
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ConfigError(f"{{fsdp}} needs a newer PyTorch (FSDP2 with summed gradient "
                          f"reduction; 2.13 is tested), this is {torch.__version__}",
                          fields={"fsdp": "TrainConfig.fsdp"})
    record_fingerprint_before_sharding(model)
    return _shard(model, device, world)


def _shard(model: nn.Module, device: torch.device, world: int) -> list[nn.Parameter]:
    """fully_shard each decoder block and the root; the trainable parameters after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ConfigError(f"{{fsdp}} needs a newer PyTorch (FSDP2 with summed gradient "
                          f"reduction; 2.13 is tested), this is {torch.__version__}",
                          fields={"fsdp": "TrainConfig.fsdp"})
    if device.type == "cpu":
        _give_freed_blocks_back()
    mesh = init_device_mesh(device.type, (world,))
    wrapped = [*decoder_blocks(model), model]
    for module in wrapped:
        fully_shard(module, mesh=mesh)
    for method in _ENTRY_METHODS:
        if callable(getattr(model, method, None)):
            # Called instead of forward (the preference losses'): gathered as forward is
            register_fsdp_forward_method(model, method)
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


def _give_freed_blocks_back() -> None:
    """On the CPU, let each block's gathered weights go back to the OS when FSDP frees them.

    glibc serves an allocation from its heap rather than its own mapping once a freed mapping
    of that size was seen (the mmap threshold rises, up to 32 MiB), and a heap keeps what is
    freed in its middle: a block's gathered weights, freed after its forward, then stay in the
    process's memory, so after one step each process holds the whole model again (measured: 1351
    against 843 MiB peak RSS per process for a 540 MiB base on 2 processes). Fixing the threshold
    at glibc's initial 128 KiB maps every larger tensor on its own and unmaps it when freed. A
    no-op without glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def unloaded(model: nn.Module) -> bool:
    """Whether ``model``'s base weights are on the meta device (model.io.load_skeleton): under
    fsdp each process then reads only its shards of them (``shard_and_load``)."""
    return any(p.is_meta for p in model.parameters())


def stand_in(model: nn.Module) -> set[int]:
    """Before LoRA is injected into an unloaded model: each meta parameter becomes a CPU tensor
    of its shape and dtype that holds no memory (one zero, expanded). The adapters are then
    made, and drawn from the run's random numbers, exactly as on a loaded model (on the CPU,
    in the same order, with the same draws); ``shard_and_load`` puts the meta tensors back.

    Returns:
        The storages the stand-ins share (one zero per dtype), what ``shard_and_load`` is given
        to tell them from the adapters."""
    zeros: dict[torch.dtype, torch.Tensor] = {}
    done: dict[int, nn.Parameter] = {}  # tied weights: one stand-in for both
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                zero = zeros.setdefault(p.dtype, torch.zeros((), dtype=p.dtype))
                done[id(p)] = nn.Parameter(zero.expand(p.shape), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return {t.untyped_storage().data_ptr() for t in zeros.values()}


def shard_and_load(model: nn.Module, path: Path, device: torch.device, world: int,
                   shares: set[int]) -> list[nn.Parameter]:
    """``shard_model`` for a model ``stand_in`` prepared, its LoRA injected: the base is sharded
    on the meta device, then each process allocates its shards alone and reads only their rows
    from the base at ``path`` (state_files.BaseSlices: safetensors, or a zip-format ``.pth`` /
    ``.bin`` mapped). No process holds the whole base: the largest
    tensor a process reads is its slice of one weight (rank 0 also reads the LoRA layers' whole
    weights one at a time for the base fingerprint). The adapters keep the values they were
    given (every process drew the same ones); a DoRA magnitude is the norm of its weight's rows.

    Args:
        shares: what ``stand_in`` returned.

    Returns:
        The trainable parameters, now DTensors.

    Raises:
        WeightsError: a damaged file, or a weight that is not finite.
    """
    kept: dict[str, torch.Tensor] = {}  # the adapters as drawn: small, put back after
    meta: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if p.untyped_storage().data_ptr() in shares and not p.is_meta:
                if id(p) not in meta:
                    meta[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype,
                                                           device="meta"),
                                               requires_grad=p.requires_grad)
                module._parameters[name] = meta[id(p)]
            elif not p.is_meta:
                kept[f"{module_name}.{name}" if module_name else name] = p.detach().clone()
    slices = BaseSlices(path)
    fingerprint = [_file_fingerprint(model, slices) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(fingerprint, src=0)  # the file is read once
    record_sharded_fingerprint(model, cast(str, fingerprint[0]))
    _shard(model, device, world)
    model.to_empty(device=device)  # each process allocates its shards only
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in kept:
                load_whole_(p, kept[name])
            else:
                _read_shard(p, name, slices)
        _dora_magnitudes(model)  # drawn over the stand-in's zeros: computed again
    return [p for p in model.parameters() if p.requires_grad]


def _read_shard(param: torch.Tensor, name: str, slices: BaseSlices) -> None:
    """This process's shard of base weight ``name``, read from the file: its rows only."""
    local = cast(Any, param).to_local() if is_sharded(param) else param
    rows = _rows(param)
    if rows is not None and rows[1] - rows[0] != local.shape[0]:
        raise AssertionError(f"{name}: rows {rows} for a shard of {tuple(local.shape)}")
    if local.numel() == 0:
        return  # more processes than rows: this one holds none
    if name not in slices or slices.shape(name) != tuple(param.shape):
        stored = f"is {slices.shape(name)}" if name in slices else "is not there"
        raise WeightsError(f"{slices.source}: {name} {stored}; the model expects "
                           f"{tuple(param.shape)} (the model was not built from this base)")
    value = slices.read(name, rows)
    problems = tensor_problems({name: value})
    if problems:  # as load_model refuses them
        raise WeightsError(f"{slices.source}: not usable base weights: " + "; ".join(problems))
    local.copy_(value.to(local.dtype).reshape(local.shape))


def _rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows of ``param``'s first dimension this process holds: FSDP2 cuts it in
    ``torch.chunk``'s pieces, one per rank (None: not sharded, the whole tensor)."""
    if not is_sharded(param):
        return None
    from torch.distributed.tensor import Shard

    sharded: Any = param
    (placement,) = sharded.placements
    assert isinstance(placement, Shard) and placement.dim == 0, placement  # FSDP2's default
    n, world = param.shape[0], sharded.device_mesh.size()
    chunk = -(-n // world)
    begin = min(sharded.device_mesh.get_local_rank() * chunk, n)
    return begin, min(begin + chunk, n)


def _dora_magnitudes(model: nn.Module) -> None:
    """Each DoRA magnitude as its init computes it, ``norm(W, dim=1)`` (B starts at zero), from
    the rows of W this process holds: W and m are cut at the same rows."""
    for _, layer in lora_modules(model):
        for magnitude in layer.lora_magnitude_vector.values():
            w = cast(Any, layer.weight).to_local() if is_sharded(layer.weight) else layer.weight
            m = cast(Any, magnitude).to_local() if is_sharded(magnitude) else magnitude
            m.copy_(torch.linalg.norm(w.float(), dim=1).to(m.dtype))


def _file_fingerprint(model: nn.Module, slices: BaseSlices) -> str:
    """The base fingerprint of the LoRA layers' weights in the file, read one at a time."""
    class _FromFile(Mapping[str, torch.Tensor]):
        def __init__(self, paths: list[str]) -> None:
            self.paths = paths

        def __getitem__(self, path: str) -> torch.Tensor:
            return slices.read(f"{path}.weight").float()

        def __iter__(self) -> Iterator[str]:
            return iter(self.paths)

        def __len__(self) -> int:
            return len(self.paths)

    return hash_weights(_FromFile([n for n, _ in lora_modules(model)]))


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
