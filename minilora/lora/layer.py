"""The LoRA layer: `LoRALinear`, its reference forward, its fast path and its merge.

The fast path is minilora.core.lowrank's kernel, the same one a fused group of sibling layers
runs (minilora.model.fused): a single layer is the group of one. The variants (DoRA, PiSSA) are
minilora.lora.variants' classes.

`LoRALinear` wraps a Linear by composition: it owns the base layer's `weight` and `bias` under
their own names (so a model's base state_dict keys do not change) and keeps every adapter,
"default" included, in one `nn.ModuleDict` per kind keyed by the adapter's name (PEFT's
layout): `lora_A[name]` (in -> r), `lora_B[name]` (r -> out), with y = W x + b + scaling * B A
dropout(x) per active adapter. Adapter names in memory (`<path>.lora_A.<name>.weight`) are not
those on disk: minilora.adapters.folder maps one to the other.

The layer knows one set of active adapters and nothing of the model around it: choosing
adapters model-wide and mixed batches live in minilora.lora.named, injection in
minilora.lora.injection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilora.core.errors import (  # noqa: F401  (re-exported: minilora.lora.layer.MergeError)
    ConfigError,
    MergeError,
)
from minilora.core.lowrank import compute_dtype, lowrank_linear
from minilora.lora.adapter_set import (
    UPCAST_DTYPES,
    AdapterSet,
    LinearDict,
    ParameterDict,
)
from minilora.lora.config import (  # noqa: F401  (re-exported: minilora.lora.layer.LoraConfig)
    BASE_ROW,
    DEFAULT_ADAPTER,
    INITS,
    MAX_REGEX_LENGTH,
    SPECIAL_TARGETS,
    LoraConfig,
    check_adapter_name,
    check_regex,
    lora_scaling,
    matches,
)
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.quantized_weight import base_output, is_quantized, quant_kind
from minilora.lora.routes import Routes  # noqa: F401  (re-exported: minilora.lora.layer.Routes)
from minilora.lora.stacked import AdapterStack, add_gathered, build_stack
from minilora.lora.variants import LoraVariant, variant_for

# The fast path's view of the one active adapter: (A, B, scaling, dropout).
FastAdapter = tuple[nn.Linear, nn.Linear, float, float]
# LoRALinear.fused_parts: (weight, bias, (A's weight, B's weight, scaling) or None).
FusedParts = tuple[torch.Tensor, torch.Tensor | None,
                   tuple[torch.Tensor, torch.Tensor, float] | None]


class LoRALinear(AdapterSet, nn.Module):
    """A Linear layer plus one or more named low-rank updates, by composition.

    Args:
        base: the Linear to wrap; its `weight` and `bias` Parameters are taken over as they are
            (same objects, so ties and optimizer references survive).
        r: rank of the first adapter.
        alpha: its scaling numerator.
        dropout: dropout on the LoRA branch's input while training (no op at all when 0).
        init: "gaussian" (A ~ N(0, 0.02)) or "kaiming" (PEFT's kaiming-uniform), B = 0; or
            "pissa": A, B from the top-r SVD of the weight, which keeps the residual.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        name: the first adapter's name.
        use_dora: weight-decomposed LoRA (DoRA): a magnitude m per output row.

    Per adapter name: `lora_A[name]`, `lora_B[name]` (nn.Linear without bias),
    `lora_magnitude_vector[name]` (DoRA only), and the plain dicts `r`, `lora_alpha`,
    `scaling`, `lora_dropout`, `use_rslora`, `init`, `variant` (its LoraVariant, see
    minilora.lora.variants), `lora_config` (the LoraConfig that injected it, or None) and
    `pissa_from` (PiSSA adapters: the fingerprint of the weights the init replaced, set by
    inject_lora). `active_adapters` names those a forward adds.

    Layer-wide state, declared here and nowhere else: `routes` (a mixed batch's rows per
    adapter for the current call, set by minilora.lora.named.mixed_adapters, else None),
    `stacked` (the adapters stacked for a mixed batch's gathered path, a cache that
    `adapter_stack` keeps current; see minilora.lora.stacked), `gather_mixed` (True: a mixed
    batch gathers each row's adapter from `stacked`; False: it runs one adapter at a time) and
    `quantized_from` (set by minilora.lora.qlora.quantize_model: the fingerprint of the
    full-precision weights, the kind, the LoRA layers quantized together; else None) and
    `sharded_from` (set by minilora.lora.fingerprint.record_fingerprint_before_sharding: the
    whole weights' fingerprint before FSDP shards them; else None).

    The variants (DoRA, PiSSA) live behind one interface (minilora.lora.variants): the layer
    asks an adapter's variant how it starts, what it adds, what merging adds, and whether the
    fast path computes it.

    Raises:
        ConfigError: when r is larger than min(in_features, out_features).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "gaussian",
        use_rslora: bool = False,
        name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = LinearDict()
        self.lora_B = LinearDict()
        # DoRA's magnitude m per adapter that has use_dora (out_features,)
        self.lora_magnitude_vector = ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self.variant: dict[str, LoraVariant] = {}  # how each adapter computes (variants.py)
        self.lora_config: dict[str, LoraConfig | None] = {}
        # PiSSA adapters: the fingerprint of the weights their init replaced (inject_lora)
        self.pissa_from: dict[str, str] = {}
        # a mixed batch's (adapter, rows) for the current call (named.mixed_adapters), else None
        self.routes: Routes | None = None
        # the adapters stacked for a mixed batch (adapter_stack builds it, add/delete drop it)
        self.stacked: AdapterStack | None = None
        # False: a mixed batch runs one adapter at a time (the reference the benchmarks compare)
        self.gather_mixed = True
        # quantize_model's record: the full-precision weights' fingerprint, kind, layers
        self.quantized_from: dict[str, Any] | None = None
        # record_fingerprint_before_sharding's record: the whole weights' fingerprint, layers
        self.sharded_from: dict[str, Any] | None = None
        self._fast: tuple[Any, ...] | None = None
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        # The weight before merge(), restored by unmerge() (a plain attribute: not state).
        self._unmerged_weight: torch.Tensor | None = None
        self.enabled = True
        self.add_adapter(name, r, alpha, dropout, init, use_rslora, use_dora=use_dora)
        self.set_active([name])

    # ------------------------------------------------------------ adapters

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "gaussian",
        use_rslora: bool = False,
        config: LoraConfig | None = None,
        use_dora: bool = False,
    ) -> None:
        """Adds an adapter that leaves the layer's output as it was (B = 0; with PiSSA the
        weight keeps the residual of what A and B take); it is not made active.

        Raises:
            ConfigError: on a bad or taken name, a bad init, r > min(in_features,
                out_features), or PiSSA / DoRA on a quantized weight.
        """
        check_adapter_name(name)
        if name in self.lora_A:
            raise ConfigError(f"this layer already has an adapter named {name!r}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ConfigError(
                f"r={r} must be between 1 and min(in_features, out_features) = "
                f"min({self.in_features}, {self.out_features})"
            )
        w = self.weight
        # a quantized (integer) base weight gets float32 adapters too
        low = w.dtype in UPCAST_DTYPES or not w.dtype.is_floating_point
        dtype = torch.float32 if low else w.dtype
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device,
                                      dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device,
                                      dtype=dtype)
        self._record(name, r, alpha, dropout, use_rslora, init, config,
                     variant_for(init, use_dora))
        self.stacked = None
        self._init_adapter(name, init)

    @torch.no_grad()
    def _init_adapter(self, name: str, init: str) -> None:
        """A drawn as `init` says and B = 0, then the adapter's variant finishes it (PiSSA
        replaces both, DoRA adds its magnitude)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "gaussian":
            nn.init.normal_(a, mean=0.0, std=0.02)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init != "pissa":
            nn.init.zeros_(b)
        self.variant[name].init(self, name)

    def delete_adapter(self, name: str) -> None:
        """Removes an adapter and its Parameters from this layer.

        Raises:
            ConfigError: when the layer has no such adapter, or it is merged into `weight`.
        """
        self._forget(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.pissa_from.pop(name, None)
        self.stacked = None
        self.set_active([n for n in self.active_adapters if n != name])

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The names of the adapters a forward adds, in order."""
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: Sequence[str]) -> None:
        self._active_adapters = tuple(names)
        self._base_only = not self._active_adapters
        # What the fast path reads: the one active adapter's modules and numbers, not its name,
        # so a compiled forward guards on shapes and values and switching between adapters of
        # one shape reuses its graph (a name read in forward would be guarded on, one graph per
        # adapter). Set with the active adapters: their settings are fixed once added.
        one = self._active_adapters[0] if len(self._active_adapters) == 1 else None
        self._fast = None if one is None or not self.variant[one].fast_path else (
            self.lora_A[one], self.lora_B[one], self.scaling[one], self.lora_dropout[one])

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """[A, B] of adapter `name`, and DoRA's magnitude m when it has one."""
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g})"
                             for n in self.lora_A)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters=[{adapters}], active={list(self.active_adapters)}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus each active adapter's update: the one-module case of the low-rank kernel
        (minilora.core.lowrank) where it applies, else `reference_forward`, which it equals.

        Raises:
            ValueError: a mixed batch (see `routes`) whose input is not (batch, ...) with one
                row per routed row.
        """
        routes = self.routes
        if routes is not None:
            if routes.every_row is None:  # rows of several adapters
                return self._routed_forward(x)
            if x.dim() >= 3 and x.shape[0] != routes.n_rows:
                self._refuse_rows(x)
        parts = self._kernel_parts()
        if parts is not None and parts[2] is not None:
            weight, bias, adapter, p = parts
            dt = compute_dtype(x, weight.dtype)
            if dt is not None:  # the common case, training or not: one autograd node
                xa = F.dropout(x, p, training=True) if self.training and p > 0 else None
                return lowrank_linear(x, (weight,), (bias,), (adapter,), dt, xa)[0]
        if routes is not None:
            return self._routed_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The formula the fast path must equal: base(x) + each active adapter's update (the
        base alone when disabled; the weight before merge when merged and disabled)."""
        if self.merged and not self.enabled:
            assert self._unmerged_weight is not None  # merge() keeps it while merged
            return F.linear(x, self._unmerged_weight, self.bias)
        base = y = base_output(self, x)  # (..., out); the quantized matmul on a QLoRA base
        for name in self.active_adapters if self.enabled and not self.merged else ():
            y = y + self.lora_update(x, name, base).to(y.dtype)
        return y

    def lora_update(self, x: torch.Tensor, name: str, base: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `base` = W x + b: (..., out).

        LoRA: scaling * B A dropout(x); a variant (DoRA) computes its own from that (see
        minilora.lora.variants).
        """
        a, b = self.lora_A[name], self.lora_B[name]
        xa = F.dropout(x, self.lora_dropout[name], training=True) if self.dropping(name) else x
        if not torch.is_autocast_enabled(x.device.type):
            xa = xa.to(a.weight.dtype)  # float32 adapters on a low-precision base
        lora = b(a(xa)) * self.scaling[name]  # (..., out)
        return self.variant[name].update(self, name, xa, lora, base)

    def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each row gets its own adapter's update; rows of the base, or of an
        adapter this layer lacks, get the base. Gathered from the stacked adapters in one
        batched product where `_gathers` allows (minilora.lora.stacked), the rows of the other
        adapters (a variant off the fast path, or all of them) one adapter at a time."""
        assert self.routes is not None  # forward calls this only for a mixed batch
        routes = self.routes
        if x.dim() < 3 or x.shape[0] != routes.n_rows:
            self._refuse_rows(x)
        y = base_output(self, x)  # (B, T, out)
        if not self.enabled:
            return y
        groups = routes.groups
        stack = self._gathers(routes)
        if stack is not None:
            assert routes.slots is not None  # _gathers checks it
            add_gathered(y, x, stack, routes.slots, routes.slot_ids)
            groups = tuple(g for g in groups if g[0] in stack.looped) if stack.looped else ()
        for name, rows in groups:
            # rows of one group only: y's rows there still hold the base output
            delta = self.lora_update(x.index_select(0, rows), name, y.index_select(0, rows))
            # Into y's own memory (a copy of y per adapter would cost more than the update);
            # safe for autograd: linear's backward does not read its output.
            y.index_add_(0, rows, delta.to(y.dtype))
        return y

    def _refuse_rows(self, x: torch.Tensor) -> None:
        assert self.routes is not None
        raise ValueError(
            f"a mixed batch of {self.routes.n_rows} rows needs every LoRA layer input shaped "
            f"(batch, sequence, features), got {tuple(x.shape)} (layers that see tokens "
            "regrouped, such as MoE experts, cannot route rows)")

    def _gathers(self, routes: Routes) -> AdapterStack | None:
        """The stack this call gathers from, or None: the per-adapter loop runs every row.

        It gathers when `gather_mixed` is on, the rows name an adapter on the fast path, the
        routes' slots index this layer's stack, and the stack's weights may stand in for the
        Parameters: no dropout applies, no gradient must reach them, and no compiler traces the
        call (the stack is a cache read outside autograd and the graph). Serving (no training,
        no gradient) reads no adapter's settings here: this runs for every layer of every
        decode step."""
        if (not self.gather_mixed or not routes.groups or routes.slots is None
                or torch.compiler.is_compiling()):
            return None
        grad = torch.is_grad_enabled()
        if self.training or grad:
            fast = [name for name, _ in routes.groups if self.variant[name].fast_path]
            if any(self.dropping(name) for name in fast) or (grad and any(
                    p.requires_grad for name in fast for p in self.adapter_parameters(name))):
                return None
        stack = self.adapter_stack(check=routes.check_stack)
        # the stack holds the layer's adapters as they are (add and delete drop it); the slots
        # were numbered for the adapters the layer had when routed
        if stack.names != routes.adapters:
            return None
        if stack.looped and all(name in stack.looped for name, _ in routes.groups):
            return None  # no row on the fast path
        return stack

    def weights_changed(self) -> None:
        """Tells the layer its adapters' weights were written in place (loading an adapter
        does): its stack is read again at the next mixed batch. Writes to tensors with a
        version counter are noticed without it (unless a caller vouched for the weights, see
        `mixed_adapters(..., check_stacks=False)`); those made under `torch.inference_mode`
        have none."""
        self.stacked = None

    def adapter_stack(self, check: bool = True) -> AdapterStack:
        """This layer's adapters stacked for a mixed batch (minilora.lora.stacked): `stacked`,
        rebuilt first when an adapter was added or deleted, or (`check`) any A or B changed
        since."""
        if self.stacked is None or (check and not self.stacked.current()):
            self.stacked = build_stack(self)
        return self.stacked

    def _kernel_parts(self) -> tuple[Any, ...] | None:
        """(weight, bias, (A, B, scaling) of the one active adapter or None for the base alone,
        its dropout), what the low-rank kernel computes this layer with; None when the
        reference must run: several active adapters, a variant off the fast path, a quantized
        weight, merged and disabled, a mixed batch whose rows name more than one adapter.

        A mixed batch whose every row names one adapter (`Routes.every_row`) is that adapter
        active: the kernel runs it as the layer's one adapter (or the base alone, where the
        layer lacks it), fused with its siblings; rows of several adapters are routed."""
        if is_quantized(self.weight) or (self.merged and not self.enabled):
            return None
        if self.routes is not None:  # (merged LoRA is refused before routing)
            name = self.routes.every_row
            if name is None or not self.enabled:
                return None
            if name not in self.lora_A:
                return self.weight, self.bias, None, 0.0
            if not self.variant[name].fast_path:
                return None
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            return self.weight, self.bias, (a, b, self.scaling[name]), self.lora_dropout[name]
        if not self.enabled or self.merged or self._base_only:
            return self.weight, self.bias, None, 0.0
        if self._fast is None:  # several active adapters, or a variant off the fast path
            return None
        a, b, scale, p = self._fast  # not the name: see active_adapters
        return self.weight, self.bias, (a.weight, b.weight, scale), p

    def fused_parts(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """What minilora.model.fused needs to run this layer inside a group of siblings reading x
        (the same kernel as forward, several modules at once): (weight, bias, (A, B, scaling)
        of the one active adapter, or None for the base alone), or None when this call needs
        forward's own paths (see `_kernel_parts`; dropout while training too)."""
        if self.routes is not None and x.dim() >= 3 and x.shape[0] != self.routes.n_rows:
            self._refuse_rows(x)
        parts = self._kernel_parts()
        if parts is None or (self.training and parts[3] > 0):
            return None
        return parts[:3]

    def dropping(self, name: str) -> bool:
        """Whether adapter `name`'s dropout applies in this call (training, p > 0)."""
        return self.training and self.lora_dropout[name] > 0

    # ------------------------------------------------------------ merging

    @torch.no_grad()
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """Returns what merging adds to `weight`, in float32: of adapter `name`, or summed over
        the active adapters (name=None)."""
        w = self.weight.float() if self._unmerged_weight is None else self._unmerged_weight.float()
        total = torch.zeros_like(w)
        for n in self.active_adapters if name is None else [name]:
            b, a = self.lora_B[n].weight.float(), self.lora_A[n].weight.float()
            total += self.variant[n].delta(self, n, w, (b @ a).mul_(self.scaling[n]))
        return total

    # merge and unmerge: AdapterSet's. The weight before the merge is kept (a copy as large
    # as `weight`, held until unmerge), so unmerging gives back exactly the base: W + d - d
    # rounds differently from W, and a drifted base would change its fingerprint. A merge
    # that would put inf or NaN in is refused (PEFT's safe_merge).

    def _merge_target(self) -> str:
        return f"weight ({self.out_features} x {self.in_features})"

    def _check_mergeable(self) -> None:
        if is_quantized(self.weight):
            raise ConfigError(
                f"cannot merge LoRA into a {quant_kind(self.weight)}-quantized base weight (the "
                "update would be rounded away); merge the adapter into the full-precision base "
                "instead (minilora merge --model BASE --adapter DIR)")

    def to_linear(self) -> nn.Linear:
        """Returns a plain nn.Linear computing base + the active adapters' update (merges them
        first, shares Parameters); inactive adapters are dropped, and so is the pre-merge copy
        of the weight."""
        self.merge()
        self._unmerged_weight = None
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


# Every kind of LoRA layer: a Linear's, or an embedding's (minilora.lora.embedding).
LoRALayer = LoRALinear | LoRAEmbedding


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Returns (name, module) of every LoRA layer in `model` (LoRALinear and LoRAEmbedding,
    found by type), in model order (`named_modules`' order, each module once).

    A LoRA layer's own children (its adapters' layers, two per adapter) are not walked: no LoRA
    layer is inside one, and with many adapters they are most of the model's modules (a mixed
    batch looks the layers up on every call)."""
    found: list[tuple[str, LoRALayer]] = []
    seen: set[nn.Module] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if module in seen:
            return
        seen.add(module)
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            found.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def linear_lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Returns (name, module) of every LoRALinear in `model` (no embedding), in model order."""
    return [(n, m) for n, m in lora_modules(model) if isinstance(m, LoRALinear)]
