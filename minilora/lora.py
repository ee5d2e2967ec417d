"""LoRA layers and the functions that put them into any nn.Module.

`LoRALinear` wraps a Linear by composition: it owns the base layer's `weight` and `bias` under
their own names (so a model's base state_dict keys do not change) and adds `lora_A` (r, in) and
`lora_B` (out, r) beside them: y = W x + b + scaling * B A dropout(x).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

SPECIAL_TARGETS = ("all-linear", "square")
INITS = ("gaussian", "kaiming")
# Low-precision bases get float32 adapters (PEFT does the same): bf16 optimizer updates of a
# zero-initialised B would round away.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class LoraConfig:
    """What to adapt and how.

    Attributes:
        r: rank of the update B @ A.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout probability on the LoRA branch's input (training only).
        targets: module-name suffixes (["q_proj", "v_proj"]), a full-match regex on module
            names, "all-linear" (every Linear but the output head) or "square" (in == out, the
            seed's rule).
        exclude: module-name suffixes (or a full-match regex) never adapted.
        init: "gaussian" (A ~ N(0, 0.02), the seed's) or "kaiming" (uniform, PEFT's default).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"
    exclude: list[str] | str = field(default_factory=list)
    init: str = "gaussian"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoraConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.targets = _check_names("targets", self.targets, allow_empty=False)
        self.exclude = _check_names("exclude", self.exclude, allow_empty=True)
        if self.exclude in SPECIAL_TARGETS:
            raise ValueError(f"LoraConfig.exclude cannot be {self.exclude!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with use_rslora."""
        return _scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        """Returns a JSON-serialisable dict that `from_dict` reads back."""
        d = asdict(self)
        for key in ("targets", "exclude"):
            if isinstance(d[key], list):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        """Builds a config from a dict such as `to_dict()` returns.

        Raises:
            ValueError: on an unknown key (the message lists the valid ones) or an invalid value.
        """
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"unknown LoraConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)


def _check_names(what: str, value: object, *, allow_empty: bool) -> list[str] | str:
    if isinstance(value, str):
        if value in SPECIAL_TARGETS:
            return value
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"LoraConfig.{what} is not a valid regex {value!r}: {e}") from None
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise ValueError(
            f"LoraConfig.{what} must be a list of module-name suffixes or a regex string, "
            f"got {value!r}"
        )
    if not value and not allow_empty:
        raise ValueError(f"LoraConfig.{what} is empty; name at least one module suffix")
    return list(value)


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A Linear layer plus a low-rank update, by composition.

    Args:
        base: the Linear to wrap; its `weight` and `bias` Parameters are taken over as they are
            (same objects, so ties and optimizer references survive).
        r: rank.
        alpha: scaling numerator.
        dropout: dropout on the LoRA branch's input while training (no op at all when 0).
        init: "gaussian" (A ~ N(0, 0.02)) or "kaiming" (PEFT's kaiming-uniform); B starts at zero.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.

    Raises:
        ValueError: when r is larger than min(in_features, out_features).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "gaussian",
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(
                f"r={r} must be between 1 and min(in_features, out_features) = "
                f"min({self.in_features}, {self.out_features})"
            )
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        lora_dtype = torch.float32 if w.dtype in _UPCAST_DTYPES else w.dtype
        kw = {"bias": False, "device": w.device, "dtype": lora_dtype}
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.init = init
        self.scaling = _scaling(r, self.alpha, use_rslora)
        # The LoraConfig that injected this layer (set by inject_lora; None when built by hand),
        # so an adapter can be saved with the targets the user asked for.
        self.config: LoraConfig | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        self.enabled = True
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "gaussian") -> None:
        """Re-initialises A (gaussian or kaiming) and zeroes B, so the update starts at zero."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, mean=0.0, std=0.02)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}, enabled={self.enabled}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        # Merged + enabled: W already holds the update. Unmerged + disabled: base only.
        if self.enabled == self.merged:
            return y
        # Merged + disabled subtracts the update again, without touching W.
        scale = self.scaling if self.enabled else -self.scaling
        if self.enabled and self.dropout is not None and self.training:
            x = self.dropout(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != a.dtype and not autocast:
            x = x.to(a.dtype)
        h = F.linear(x, a).reshape(-1, self.r)  # (N, r)
        y2 = y.reshape(-1, self.out_features)  # (N, out), a view of y
        if not autocast and y2.dtype == b.dtype:
            # The scale goes into the GEMM's alpha and the sum into y's own memory: no extra
            # elementwise pass and no second output-sized tensor. Safe for autograd: linear's
            # backward does not read its output.
            y2.addmm_(h, b.t(), alpha=scale)
        elif autocast:
            y2 = torch.addmm(y2, h, b.t(), alpha=scale)  # autocast casts all three alike
        else:
            y2 = y2 + torch.mm(h, b.t()).mul_(scale).to(y2.dtype)
        return y2.view(y.shape)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """Returns scaling * B @ A in float32, shaped like `weight`."""
        b = self.lora_B.weight.float()
        a = self.lora_A.weight.float()
        return (b @ a).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into `weight` (computed in float32); a no-op when already merged."""
        if self.merged:
            return
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the update from `weight` again; a no-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """Returns a plain nn.Linear computing base + update (merges first, shares Parameters)."""
        self.merge()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


@dataclass
class InjectionReport:
    """What `inject_lora` did.

    Attributes:
        modules: (name, in_features, out_features) of every adapted Linear, in model order.
        lora_parameters: number of LoRA parameters added, sum of r * (in + out).
    """

    modules: list[tuple[str, int, int]]
    lora_parameters: int

    def __str__(self) -> str:
        lines = [f"{name}: {i} -> {o}" for name, i, o in self.modules]
        lines.append(f"{len(self.modules)} modules, {self.lora_parameters:,} LoRA parameters")
        return "\n".join(lines)


@dataclass
class ParameterCounts:
    """Parameter counts as the seed prints them (shared Parameters counted once)."""

    total: int
    trainable: int
    lora: int

    def __str__(self) -> str:
        share = 100.0 * self.lora / self.total if self.total else 0.0
        return (
            f"total {self.total:,}, trainable {self.trainable:,}, "
            f"LoRA {self.lora:,} ({share:.2f}% of total)"
        )


def _linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yields Linear and LoRALinear modules by name, never descending into a LoRALinear
    (its lora_A/lora_B are Linears too, and must not be adapted themselves)."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, (nn.Linear, LoRALinear)):
                yield name, child
            if not isinstance(child, LoRALinear):
                yield from walk(child, name)

    yield from walk(model, "")


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_head_names(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of Linears that produce the output logits: named lm_head, the model's own
    get_output_embeddings() (transformers), or a Linear whose weight is an Embedding's."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out_emb = getter()
        except (AttributeError, NotImplementedError):
            out_emb = None
    return {
        name
        for name, m in linears
        if name.split(".")[-1] == "lm_head" or m is out_emb or id(m.weight) in embedding_weights
    }


def _select(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    linears = list(_linear_modules(model))
    targets = config.targets
    if targets == "all-linear":
        heads = _output_head_names(model, linears)
        chosen = [(n, m) for n, m in linears if n not in heads]
    elif targets == "square":
        chosen = [(n, m) for n, m in linears if m.in_features == m.out_features]
    else:
        chosen = [(n, m) for n, m in linears if _matches(n, targets)]
    if config.exclude:
        chosen = [(n, m) for n, m in chosen if not _matches(n, config.exclude)]
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "(none)"
        raise ValueError(
            f"LoRA targets {config.targets!r} (exclude {config.exclude!r}) match no Linear "
            f"module; the model's Linear modules are: {names}"
        )
    return chosen


def inject_lora(model: nn.Module, config: LoraConfig) -> InjectionReport:
    """Replaces the targeted Linear modules of `model` with LoRALinear, in place.

    Args:
        model: any nn.Module (a transformers model included).
        config: rank, scaling, targets and init.

    Returns:
        An InjectionReport naming the adapted modules and the number of LoRA parameters.

    Raises:
        ValueError: when the targets match no Linear (the message lists those the model has),
            match a layer that already has LoRA, or r exceeds min(in, out) of a target. Nothing
            is changed when it raises.
    """
    chosen = _select(model, config)
    twice = [n for n, m in chosen if isinstance(m, LoRALinear)]
    if twice:
        raise ValueError(f"these layers already have LoRA (inject once per layer): {twice}")
    too_small = [
        f"{n} ({m.in_features} -> {m.out_features})"
        for n, m in chosen
        if config.r > min(m.in_features, m.out_features)
    ]
    if too_small:
        raise ValueError(
            f"r={config.r} is larger than min(in_features, out_features) of: {too_small}"
        )
    modules = []
    added = 0
    for name, linear in chosen:
        lora = LoRALinear(
            linear, config.r, config.alpha, config.dropout, config.init, config.use_rslora
        )
        lora.train(linear.training)
        lora.config = config
        _set_submodule(model, name, lora)
        modules.append((name, linear.in_features, linear.out_features))
        added += config.r * (linear.in_features + linear.out_features)
    return InjectionReport(modules=modules, lora_parameters=added)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Returns (name, module) of every LoRALinear in `model` (found by type), in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns the LoRA A and B Parameters of `model`: the list to give the optimizer."""
    params = []
    for _, m in lora_modules(model):
        params += [m.lora_A.weight, m.lora_B.weight]
    return params


def mark_trainable(model: nn.Module) -> None:
    """Freezes every Parameter of `model` except the LoRA ones."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Returns total, trainable and LoRA parameter counts (works on meta tensors too)."""
    params = list(model.parameters())  # deduplicated: tied weights count once
    return ParameterCounts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        lora=sum(p.numel() for p in lora_parameters(model)),
    )


def merge_lora(model: nn.Module) -> None:
    """Merges every LoRALinear of `model` (idempotent)."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Unmerges every LoRALinear of `model` (idempotent)."""
    for _, m in lora_modules(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and puts plain nn.Linear modules back.

    Returns:
        `model` itself (changed in place), or a new nn.Linear when `model` is a LoRALinear.
    """
    if isinstance(model, LoRALinear):
        return model.to_linear()
    for name, m in lora_modules(model):
        _set_submodule(model, name, m.to_linear())
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the base model alone inside the block (merged adapters too), then restores.

    Example:
        with disabled(model):
            base_logits = model(x)
    """
    modules = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before, strict=True):
            m.enabled = was
