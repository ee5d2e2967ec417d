"""Many adapters on one model: which are active, deleting one, mixed batches, combining.

A mixed batch sets each LoRALinear's `routes` (which rows take which adapter) for the call; the
layer then adds, for the rows of each adapter, that adapter's `lora_update` instead of its active
ones. `model(x, adapter_names=[...])` works through a pre-hook on the model that
minilora.lora.injection installs (_RowRouter).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minilora.core.errors import AdapterError, ConfigError
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.layer import (
    BASE_ROW,
    LoraConfig,
    LoRALayer,
    LoRALinear,
    Routes,
    check_adapter_name,
    linear_lora_modules,
    lora_modules,
)
from minilora.lora.saved_modules import SavedModule, modules_outside_lora, saved_layers
from minilora.lora.trainable_tokens import TrainableTokens, token_layers


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` at dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def refuse_merged(model: nn.Module, doing: str) -> None:
    """Raises ConfigError when any layer of `model` has LoRA merged in."""
    merged = [n for n, m in lora_modules(model) if m.merged]
    merged += [n for n, m in _extra_layers(model)
               if isinstance(m, TrainableTokens) and m.merged and m.tied_to is None]
    if merged:
        raise ConfigError(
            f"{doing} needs unmerged adapters, but LoRA is merged into {merged[:3]}"
            f"{'...' if len(merged) > 3 else ''}; call unmerge_lora(model) first"
        )


def list_adapters(model: nn.Module) -> list[str]:
    """Returns the names of the adapters `model` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """Returns the names of the adapters a forward of `model` adds (empty: the base)."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.active_adapters))
    return list(names)


def check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; the model has {known or 'none'}")


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Chooses which adapters a forward adds: one name, several (their updates add up), or
    None / [] / "base" for the base model alone.

    Training follows: `mark_trainable` and `lora_parameters` take the active adapters only.

    Raises:
        ConfigError: on an unknown name (the message lists the model's adapters), or when LoRA
            is merged (unmerge_lora first).
    """
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    names = [n for n in dict.fromkeys(names) if n != BASE_ROW]
    check_known(model, names)
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules) and names != active_adapters(model):
        refuse_merged(model, "changing the active adapters")
    for m in modules:
        m.set_active(names)
    set_active_extras(model, names)


def set_active_extras(model: nn.Module, names: Sequence[str]) -> None:
    """The modules to save and trainable tokens follow the active adapters (each layer takes
    the names it has)."""
    for _, saved in saved_layers(model):
        saved.set_active(names)
    for _, tokens in token_layers(model):
        tokens.set_active(names)


def delete_extras(model: nn.Module, name: str) -> None:
    """Removes adapter `name`'s modules to save and trainable tokens; a wrapper left with none
    becomes the module it wrapped."""
    for path, saved in saved_layers(model):
        saved.delete_adapter(name)
        if not saved.adapters:
            replace_submodule(model, path, saved.original)
    layers = token_layers(model)
    for _, tokens in layers:
        tokens.delete_adapter(name)
    for path, tokens in layers:  # a tied head has none once its embedding has none
        if not tokens.adapters:
            replace_submodule(model, path, tokens.to_base())


def extras_of(model: nn.Module, name: str | None = None) -> list[str]:
    """The paths where adapter `name` (any adapter, when None) has a module to save or
    trainable tokens."""
    paths = [p for p, m in saved_layers(model) if name is None or name in m.adapters]
    return paths + [p for p, m in token_layers(model) if name is None or name in m.adapters]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter `name` from every layer; a layer left with no adapter becomes a plain
    nn.Linear (or nn.Embedding) again (sharing the base Parameters). The other adapters are
    untouched.

    Raises:
        ConfigError: on an unknown name, or when that adapter is merged.
    """
    check_known(model, [name])
    merged = [n for n, m in lora_modules(model) if name in m.merged_adapters]
    if merged:
        raise ConfigError(
            f"adapter {name!r} is merged into {merged[:3]}; call unmerge_lora(model) first"
        )
    for path, m in lora_modules(model):
        if name not in m.lora_A:
            continue
        m.delete_adapter(name)
        if not m.lora_A and m is not model:
            replace_submodule(model, path, plain_module(m))
    delete_extras(model, name)
    if not lora_modules(model):
        remove_row_hooks(model)


# ---------------------------------------------------------------- mixed batches


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str | None], *,
                   check_stacks: bool = True) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter `adapter_names[i]` alone (None or
    "base": the base model), whatever `set_active` says.

    `model(input_ids, adapter_names=[...])` does the same for one call (inject_lora installs
    the hook that reads the keyword). Each row computes what it computes alone with its adapter
    active, up to float rounding. Every LoRA layer's input must be (batch, sequence, features):
    layers that see regrouped tokens (MoE experts) cannot route rows, and say so.

    Args:
        model: a model with LoRA adapters.
        adapter_names: one adapter name (or None / "base") per row.
        check_stacks: False when the caller vouches that no adapter weight is written in place
            except by minilora's adapter loading, adding and deleting (which drop the layers'
            stacked copies, see minilora.lora.stacked): each call then skips re-reading every
            A and B's version counter, about a sixth of a 32-adapter call on the embedded
            model. The server's engine, the only writer of its model's adapters, does so.

    Raises:
        ConfigError: on an unknown adapter name, an empty list, LoRA that is merged, or when a
            mixed batch is already being routed.
    """
    modules = _route(model, adapter_names, check_stacks)
    try:
        yield model
    finally:
        _unroute(modules)


def plain_module(m: LoRALayer) -> nn.Module:
    """The plain layer a LoRA layer computes with its active adapters merged in (nn.Linear or
    nn.Embedding, sharing the Parameters)."""
    return m.to_embedding() if isinstance(m, LoRAEmbedding) else m.to_linear()


def _route(model: nn.Module, adapter_names: Sequence[str | None], check_stacks: bool = True
           ) -> list[Any]:
    """Sets each LoRA layer's (and module to save's, trainable tokens') per-row routing (its
    `routes`); returns the layers (for _unroute).

    It runs on every call of a mixed batch, so the model is walked once and what layers
    holding the same adapters share (the usual case: every layer holds every adapter) is
    computed once: each adapter's rows, each row's slot, the Routes themselves."""
    names = list(adapter_names)
    if not names:
        raise ConfigError("adapter_names is empty: give one adapter name (or None) per row")
    modules, extras = _layers_to_route(model)
    if not modules:
        raise ConfigError("adapter_names given, but the model has no LoRA adapters")
    known: dict[str, None] = {}
    for m in modules:
        known.update(dict.fromkeys(m.lora_A))
    unknown = [n for n in dict.fromkeys(names)
               if n is not None and n != BASE_ROW and n not in known]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; the model has {list(known) or 'none'}")
    if any(m.merged for m in modules) or any(
            isinstance(m, TrainableTokens) and m.merged and m.tied_to is None for m in extras):
        refuse_merged(model, "a mixed batch (adapter_names per row)")  # names the layers
    if any(m.routes is not None for m in modules):
        raise ConfigError("a mixed batch is already being routed (mixed_adapters is not nested)")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None and name != BASE_ROW:
            groups.setdefault(name, []).append(row)
    gathering = not torch.compiler.is_compiling()  # a traced call runs the per-adapter loop
    # the adapter every row names, if one: each layer runs it as its one active adapter
    every_row = next(iter(groups)) if len(groups) == 1 and len(
        next(iter(groups.values()))) == len(names) else None
    rows_on: dict[torch.device, dict[str, torch.Tensor]] = {}
    shared: dict[tuple[type, tuple[str, ...], torch.device], Routes] = {}
    for m in modules:
        device = m.weight.device
        adapters = m.adapter_names
        key = (type(m), adapters, device)
        if key not in shared:
            if device not in rows_on:
                rows_on[device] = _row_tensors(groups, device)
            shared[key] = _routes_for(m, adapters, names, groups, rows_on[device], gathering,
                                      check_stacks, every_row)
        m.routes = shared[key]  # the layer adds each row's adapter until _unroute
    return modules + _route_extras(extras, groups, len(names))


def _row_tensors(groups: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each adapter's rows as a long tensor on `device`: views of one tensor (one copy to the
    device, not one per adapter)."""
    flat = torch.tensor([row for rows in groups.values() for row in rows], dtype=torch.long,
                        device=device)
    return dict(zip(groups, flat.split([len(rows) for rows in groups.values()]), strict=True))


def _routes_for(m: LoRALayer, adapters: tuple[str, ...], names: list[str | None],
                groups: dict[str, list[int]], rows_on: dict[str, torch.Tensor],
                gathering: bool, check_stacks: bool, every_row: str | None) -> Routes:
    """The Routes of a layer holding `adapters`: the rows of each adapter it has (tensors on
    its device, `rows_on`) and, for a Linear's gathered path, each row's slot."""
    device = m.weight.device
    routed = [(name, rows_on[name]) for name in groups if name in adapters]
    if not isinstance(m, LoRALinear):  # an embedding's lookup loops
        return Routes(tuple(routed), len(names))
    if not gathering:  # a traced call: the per-adapter loop (no adapter name read as a guard)
        return Routes(tuple(routed), len(names))
    if every_row is not None:  # one adapter: the layer's own kernel
        return Routes(tuple(routed), len(names), every_row=every_row)
    slot = {a: i for i, a in enumerate(adapters)}  # the base's slot: len(adapters)
    slot_ids = tuple(slot.get(n, len(adapters)) if n is not None else len(adapters)
                     for n in names)
    slots = torch.tensor(slot_ids, dtype=torch.long, device=device)
    return Routes(tuple(routed), len(names), adapters, slots, slot_ids,
                  check_stack=check_stacks)


def _route_extras(extras: list[SavedModule | TrainableTokens], groups: dict[str, list[int]],
                  n_rows: int) -> list[Any]:
    """Sets the modules to save's and trainable tokens' routes (each the rows of the adapters
    it has); returns them."""
    ordered: list[SavedModule | TrainableTokens] = [m for m in extras
                                                    if isinstance(m, SavedModule)]
    ordered += [m for m in extras if isinstance(m, TrainableTokens)]
    for m in ordered:
        device = m.weight.device if isinstance(m, TrainableTokens) else next(
            iter(m.parameters()), torch.empty(0)).device
        m.routes = Routes(tuple((name, torch.tensor(rows, dtype=torch.long, device=device))
                                for name, rows in groups.items() if name in m.adapters), n_rows)
    return ordered


def _extra_layers(model: nn.Module) -> list[tuple[str, SavedModule | TrainableTokens]]:
    """(name, module) of every module to save and trainable tokens of `model`, in model order:
    what `saved_layers` and `token_layers` find, in one walk."""
    return [(n, m) for n, m in modules_outside_lora(model)
            if isinstance(m, (SavedModule, TrainableTokens))]


def _layers_to_route(model: nn.Module
                     ) -> tuple[list[LoRALayer], list[SavedModule | TrainableTokens]]:
    """What `lora_modules` and `_extra_layers` find, in one walk and without the names (a
    mixed batch walks the model on every call)."""
    layers: list[LoRALayer] = []
    extras: list[SavedModule | TrainableTokens] = []
    seen: set[nn.Module] = set()

    def visit(module: nn.Module) -> None:
        if module in seen:
            return
        seen.add(module)
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            layers.append(module)
            return
        if isinstance(module, (SavedModule, TrainableTokens)):
            extras.append(module)
        for child in module._modules.values():
            if child is not None:
                visit(child)

    visit(model)
    return layers, extras


def _unroute(modules: list[Any]) -> None:
    for m in modules:
        m.routes = None


class _RowRouter:
    """The hooks that let `model(..., adapter_names=[...])` route rows without the model knowing
    of LoRA: `pre` takes the keyword away and sets the layers' routes, `post` (called on an
    error too) clears them. What it holds between the two, the layers it routed, lives here."""

    def __init__(self) -> None:
        self.routed: list[Any] | None = None
        self.handles: tuple[Any, ...] = ()

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if "adapter_names" not in kwargs:
            return None
        names = kwargs.pop("adapter_names")
        if names is not None:
            self.routed = _route(module, names)
        return args, kwargs

    def post(self, module: nn.Module, args: tuple[Any, ...], output: object) -> None:
        # Plain attribute reads and writes (no dict pops): torch.compile replays them faithfully.
        if self.routed is not None:
            _unroute(self.routed)
            self.routed = None


def _router(model: nn.Module) -> _RowRouter | None:
    """The _RowRouter whose hooks are on `model`, if any."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, _RowRouter):
            return owner
    return None


def install_row_hooks(model: nn.Module) -> None:
    """Lets `model(..., adapter_names=[...])` route rows (see _RowRouter); once per model."""
    if isinstance(model, LoRALinear) or _router(model) is not None:
        return
    router = _RowRouter()
    router.handles = (model.register_forward_pre_hook(router.pre, with_kwargs=True),
                      model.register_forward_hook(router.post, always_call=True))


def remove_row_hooks(model: nn.Module) -> None:
    """Removes what install_row_hooks put on `model`."""
    router = _router(model)
    for handle in router.handles if router is not None else ():
        handle.remove()


# ---------------------------------------------------------------- combining


@dataclass
class CombineReport:
    """What `combine_adapters` built.

    Attributes:
        adapter: the new adapter's name.
        method: "linear" or "svd".
        r: its rank.
        errors: per layer, ||sum - approximation||_F / ||sum||_F of the weighted sum of
            updates (0 for "linear", which is exact up to float rounding).
    """

    adapter: str
    method: str
    r: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        """The largest relative error over the layers."""
        return max(self.errors.values(), default=0.0)

    def __str__(self) -> str:
        return (
            f"adapter {self.adapter!r}: {self.method}, r={self.r}, {len(self.errors)} layers, "
            f"max relative error {self.max_error:.3g}"
        )


COMBINE_METHODS = ("linear", "svd")


def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: str = "linear",
    r: int | None = None,
) -> CombineReport:
    """Adds adapter `name` whose update is sum_i weights[i] * update_i, and makes it active.

    Args:
        model: a model holding the adapters named in `weights`.
        weights: adapter name -> weight (any real numbers).
        name: the new adapter's name.
        method: "linear": A and B of the adapters concatenated (rank = the sum of their ranks),
            exact; "svd": the summed update re-factored to rank `r` by truncated SVD, with the
            relative error of each layer reported.
        r: the rank for "svd" (default: the sum of the ranks, which is exact).

    Returns:
        A CombineReport (rank, per-layer relative errors). The new adapter has alpha = r
        (scaling 1) and covers every layer any of the adapters covers.

    Raises:
        ConfigError: on unknown adapters, a taken or bad name, an unknown method, a rank the
            layers cannot hold, or merged LoRA.
    """
    _check_combine(model, weights, name, method)
    modules = [(p, m) for p, m in linear_lora_modules(model)
               if any(n in m.lora_A for n in weights)]
    # Each adapter owns a fixed block of rows, so the concatenation has one rank everywhere
    # (what a PEFT file needs); a layer without that adapter keeps its block at zero.
    width = {n: max(m.r[n] for _, m in modules if n in m.lora_A) for n in weights}
    total = sum(width.values())
    rank = _combined_rank(modules, method, r, total)
    errors: dict[str, float] = {}
    new: list[tuple[LoRALinear, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for path, m in modules:
            if method == "linear":
                a, b = _concatenated(m, weights, width, total)
                errors[path] = 0.0
            else:
                a, b, errors[path] = _truncated_svd(m, weights, rank, path)
            new.append((m, a, b))
        config = LoraConfig(r=rank, alpha=float(rank), targets=[p for p, _ in modules])
        for m, a, b in new:
            m.add_adapter(name, rank, float(rank), config=config)
            m.lora_A[name].weight.copy_(a)
            m.lora_B[name].weight.copy_(b)
    set_active(model, [name])
    return CombineReport(adapter=name, method=method, r=rank, errors=errors)


# How a caller names combine's settings: the library's keywords; the command line has its flags.
COMBINE_WORDS = {"rank": "r", "linear_method": "method='linear'", "svd_method": "method='svd'"}


def _combined_rank(modules: list[tuple[str, LoRALinear]], method: str, r: int | None,
                   total: int) -> int:
    """The new adapter's rank: `total` (the sum of the ranks) for "linear", `r` for "svd"."""
    if method == "linear" and r is not None and r != total:
        raise ConfigError(f"rank {r} ({{rank}}): {{linear_method}} has the sum of the ranks "
                          f"({total}); use {{svd_method}} for another rank", fields=COMBINE_WORDS)
    rank = total if method == "linear" or r is None else r
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{{rank}} must be an integer >= 1, got {r!r}", fields=COMBINE_WORDS)
    too_small = [f"{p} ({m.in_features} -> {m.out_features})" for p, m in modules
                 if rank > min(m.in_features, m.out_features)]
    if too_small:
        hint = "; use {svd_method} with a smaller {rank}" if method == "linear" else ""
        raise ConfigError(f"rank {rank} is larger than min(in, out) of {too_small}{hint}",
                          fields=COMBINE_WORDS)
    return rank


def _check_combine(model: nn.Module, weights: Mapping[str, float], name: str, method: str
                   ) -> None:
    check_adapter_name(name)
    if method not in COMBINE_METHODS:
        raise ConfigError(f"method must be one of {COMBINE_METHODS}, got {method!r}")
    if not weights:
        raise ConfigError("weights is empty: give adapter name -> weight")
    for adapter, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(
                weight):
            raise ConfigError(f"weights[{adapter!r}]: expected a finite number, got {weight!r}")
    check_known(model, list(weights))
    if name in list_adapters(model):
        raise ConfigError(
            f"adapter {name!r} exists already; delete_adapter it or pick another name")
    refuse_merged(model, "combine_adapters")
    on_embedding = sorted({n for p, m in lora_modules(model) if isinstance(m, LoRAEmbedding)
                           for n in m.lora_A if n in weights})
    if on_embedding:
        raise ConfigError(f"adapters {on_embedding} have LoRA on an embedding, which combining "
                          "does not support; combine adapters of Linear layers only")
    extras = [p for a in weights for p in extras_of(model, a)]
    if extras:  # a whole copy or a row has no low-rank update to add up
        raise ConfigError(f"combine_adapters adds LoRA updates; these adapters also train "
                          f"modules to save or token rows ({extras[0]}), which do not combine")
    # a variant whose update is no B A product (DoRA) cannot be concatenated
    apart = {n: m.variant[n].label for _, m in lora_modules(model) for n in m.variant
             if n in weights and not m.variant[n].adds_up}
    if apart and method == "linear":
        kinds = "/".join(sorted(set(apart.values())))
        raise ConfigError(f"{kinds} adapters {sorted(apart)} do not add up as B A products; "
                          "combine them "
                          "with {svd_method} (it factors their merged weight updates, which "
                          "are full rank in general: pick {rank}, the error is reported)",
                          fields=COMBINE_WORDS)


def _concatenated(
    m: LoRALinear, weights: Mapping[str, float], width: dict[str, int], total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, w_2 s_2 B_2, ...] in float32: B A = sum w_i s_i B_i A_i."""
    a = torch.zeros(total, m.in_features, device=m.weight.device)  # (R, in)
    b = torch.zeros(m.out_features, total, device=m.weight.device)  # (out, R)
    start = 0
    for n, w in weights.items():
        if n in m.lora_A:
            r = m.r[n]
            a[start:start + r] = m.lora_A[n].weight.float()
            b[:, start:start + r] = m.lora_B[n].weight.float() * (w * m.scaling[n])
        start += width[n]
    return a, b


def _truncated_svd(
    m: LoRALinear, weights: Mapping[str, float], rank: int, path: str = "a layer"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (Eckart-Young) of the weighted sum of updates, and the
    relative Frobenius error of that approximation.

    Raises:
        ConfigError: the weighted sum overflows float32 (weights such as 1e200), which the SVD
            cannot factor (torch's LinAlgError).
    """
    delta = torch.zeros(m.out_features, m.in_features, device=m.weight.device)  # (out, in)
    for n, w in weights.items():
        if n in m.lora_A:
            delta += w * m.delta_weight(n)
    if not torch.isfinite(delta).all():
        raise ConfigError(f"weights {dict(weights)}: the weighted sum of the updates of {path} "
                          "is not finite in float32; use smaller weights")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, rank)
    a = root[:, None] * vh[:rank]  # (rank, in)
    norm = torch.linalg.matrix_norm(delta)
    error = torch.linalg.matrix_norm(delta - b @ a) / norm if norm > 0 else norm
    return a, b, float(error)


def resolve_adapter(model: nn.Module, name: str | None = None, doing: str = "use") -> str:
    """The adapter a call means: `name` when given, else the model's only adapter, else its
    only active one.

    Raises:
        AdapterError: when the model has no LoRA, `name` is unknown, or None is ambiguous (its
            field ``adapter_name`` is how to name one).
    """
    names = list_adapters(model)
    if not names:
        raise AdapterError(f"the model has no LoRA modules to {doing}; inject_lora first")
    if name is not None:
        if name not in names:
            raise AdapterError(f"the model has no adapter {name!r}; it has {names}")
        return name
    if len(names) == 1:
        return names[0]
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    raise AdapterError(
        f"the model holds adapters {names} ({active or 'none'} active): pass {{adapter_name}} "
        f"to say which one to {doing}", fields={"adapter_name": "name=..."}
    )


def adapter_layers(model: nn.Module, name: str) -> list[tuple[str, LoRALayer]]:
    """(path, layer) of every layer that carries adapter `name`, in model order."""
    return [(p, m) for p, m in lora_modules(model) if name in m.lora_A]
