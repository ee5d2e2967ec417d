"""LoRA layers and the functions that put them into any nn.Module.

`LoRALinear` wraps a Linear by composition: it owns the base layer's `weight` and `bias` under
their own names (so a model's base state_dict keys do not change) and adds `lora_A` (r, in) and
`lora_B` (out, r) beside them: y = W x + b + scaling * B A dropout(x).

Several named adapters can live on one layer. The one named "default" keeps `lora_A` / `lora_B`
(so a single adapter's keys are `<path>.lora_A.weight` as always); any other name lives in
`lora_adapters.<name>.lora_A` / `.lora_B`. `set_active` picks which adapters a forward adds (one,
several, or none), and `mixed_adapters` (or `model(x, adapter_names=[...])`) gives each row of a
batch its own adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from minilora.errors import ConfigError
from minilora.quant import base_output, is_quantized, quant_kind

SPECIAL_TARGETS = ("all-linear", "square")
INITS = ("gaussian", "kaiming")
# Low-precision bases get float32 adapters (PEFT does the same): bf16 optimizer updates of a
# zero-initialised B would round away.
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_ADAPTER = "default"
# Row names that mean "the base model" in a mixed batch; "base" can therefore not name an adapter.
BASE_ROW = "base"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


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
            raise ConfigError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"LoraConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"LoraConfig.alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(
                f"LoraConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.targets = _check_names("targets", self.targets, allow_empty=False)
        self.exclude = _check_names("exclude", self.exclude, allow_empty=True)
        if self.exclude in SPECIAL_TARGETS:
            raise ConfigError(f"LoraConfig.exclude cannot be {self.exclude!r}")
        if self.init not in INITS:
            raise ConfigError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")

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
            raise ConfigError(f"unknown LoraConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)


def _check_names(what: str, value: object, *, allow_empty: bool) -> list[str] | str:
    if isinstance(value, str):
        if value in SPECIAL_TARGETS:
            return value
        try:
            check_regex(value)
        except ValueError as e:
            raise ConfigError(f"LoraConfig.{what} is not a usable regex {value!r}: {e}") from None
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise ConfigError(
            f"LoraConfig.{what} must be a list of module-name suffixes or a regex string, "
            f"got {value!r}"
        )
    if not value and not allow_empty:
        raise ConfigError(f"LoraConfig.{what} is empty; name at least one module suffix")
    return list(value)


try:  # Python 3.11+; 3.10 has the same parser under its old, now deprecated, names
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _sre_constants
    import sre_parse as _sre_parse

# Module names are short; a longer pattern is not a target list but an attack or a mistake.
MAX_REGEX_LENGTH = 500


def check_regex(pattern: str) -> None:
    """Refuse a regex that could take exponential time on a module name.

    Python's ``re`` backtracks: a repeat over something that can itself match in several ways
    (``(a+)+``, ``(a|a)*``, ``(a*)*``) can take 2**n steps on a name of n characters, and no
    timeout can stop a match in progress. So the rule is structural: no repeat may hold another
    repeat or an alternation. Target patterns need neither (``.*\\.(q|v)_proj`` is fine: the
    alternation is not under a repeat).

    Raises:
        ValueError: the pattern is invalid, longer than MAX_REGEX_LENGTH, or nests as above.
    """
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"longer than {MAX_REGEX_LENGTH} characters")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as e:
        raise ValueError(str(e)) from None
    if _nested_repeat(parsed, inside_repeat=False):
        raise ValueError("a repeated group holds another repeat or an alternation (such as "
                         "(a+)+ or (a|b)*), which can take exponential time; simplify it")


def _nested_repeat(items: object, inside_repeat: bool) -> bool:
    constants = _sre_constants
    repeats = tuple(getattr(constants, n) for n in ("MAX_REPEAT", "MIN_REPEAT",
                                                     "POSSESSIVE_REPEAT") if hasattr(constants, n))
    for op, arg in items:  # type: ignore[union-attr]
        if op in repeats:
            _, high, sub = arg
            if high != 1 and inside_repeat:
                return True
            if _nested_repeat(sub, inside_repeat or high != 1):
                return True
        elif op is constants.BRANCH:
            if inside_repeat:
                return True
            if any(_nested_repeat(b, inside_repeat) for b in arg[1]):
                return True
        elif op is constants.SUBPATTERN:
            if _nested_repeat(arg[-1], inside_repeat):
                return True
        elif op in (constants.ASSERT, constants.ASSERT_NOT):
            if _nested_repeat(arg[1], inside_repeat):
                return True
    return False


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_adapter_name(name: object) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ROW:
        raise ConfigError(
            f"adapter name {name!r}: expected letters, digits, '_' or '-' (not starting with '-'),"
            f" and not {BASE_ROW!r} (which means the base model in a mixed batch)"
        )
    return name


@dataclass(eq=False)
class AdapterSlot:
    """One named adapter inside a LoRALinear: its A and B and their settings.

    Attributes:
        name: the adapter's name.
        lora_A: nn.Linear(in, r), weight (r, in).
        lora_B: nn.Linear(r, out), weight (out, r).
        r: rank.
        alpha: scaling numerator.
        scaling: alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout probability on the adapter's input while training.
        use_rslora: rank-stabilised scaling.
        init: how A was initialised ("gaussian" or "kaiming").
        config: the LoraConfig that injected it (None when built by hand or combined).
    """

    name: str
    lora_A: nn.Linear
    lora_B: nn.Linear
    r: int
    alpha: float
    scaling: float
    dropout: float
    use_rslora: bool
    init: str
    config: LoraConfig | None = None

    def parameters(self) -> list[nn.Parameter]:
        """[A, B]: the adapter's two Parameters."""
        return [self.lora_A.weight, self.lora_B.weight]


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + (s * xa A^T) B^T as one autograd node, computed in dtype `dt`.

    Why one node with a hand-written backward instead of composing F.linear calls:
    - the update is added into the base output in place (`addmm_`) and autograd never sees it,
      so backward needs no output-sized clone (an in-place add on the Linear's output makes
      autograd record CopySlices, which copies the whole gradient);
    - each skinny product runs in its fast orientation: grad_B = (hs^T g)^T, [r, N] @ [N, out],
      which MKL/oneDNN run several times faster than [out, N] @ [N, r];
    - grad_x = g W + (g B s) A is one GEMM plus one `addmm_` into it, no extra tensor;
    - the scaling is folded into the rank-r intermediate, never into an output-sized tensor;
    - under autocast (or with a bf16 base) the branch runs in the base's compute dtype: A and B
      are cast once per call (r x in and out x r, tiny), no fp32 output-sized temporaries.

    `xa` is the branch's input when it differs from x (dropout), else None. A trainable base
    weight or bias (LoRA plus full fine-tuning of some layers) gets its gradient too; x is kept
    for backward only then.
    """

    @staticmethod
    def forward(ctx, x, xa, weight, bias, a, b, scale, dt):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
            xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1]).to(dt)
            w = weight.to(dt)
            a_, b_ = a.to(dt), b.to(dt)  # (r, in), (out, r)
            hs = (xa2 @ a_.t()).mul_(scale)  # (N, r)
            y = F.linear(x2, w, None if bias is None else bias.to(dt))  # (N, out)
            y.addmm_(hs, b_.t())
        ctx.save_for_backward(x2 if weight.requires_grad else None, xa2, hs, w, a_, b_)
        ctx.scale, ctx.dt, ctx.shared = scale, dt, xa is None
        ctx.in_dtypes = (x.dtype, None if xa is None else xa.dtype, a.dtype, b.dtype,
                         weight.dtype, None if bias is None else bias.dtype)
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, xa2, hs, w, a, b = ctx.saved_tensors
        x_dtype, xa_dtype, a_dtype, b_dtype, w_dtype, bias_dtype = ctx.in_dtypes
        need_x, need_xa, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1]).to(ctx.dt)  # (N, out)
            gh = (g2 @ b).mul_(ctx.scale)  # (N, r)
            grad_a = (gh.t() @ xa2).to(a_dtype) if need_a else None  # (r, in)
            grad_b = (hs.t() @ g2).t().to(b_dtype) if need_b else None  # (out, r)
            grad_x = grad_xa = None
            if need_x:
                grad_x = g2 @ w  # (N, in)
                if ctx.shared:
                    grad_x.addmm_(gh, a)
                grad_x = grad_x.view(ctx.in_shape).to(x_dtype)
            if need_xa:
                grad_xa = (gh @ a).view(ctx.in_shape).to(xa_dtype)
            grad_w = (g2.t() @ x2).to(w_dtype) if need_w else None  # (out, in)
            grad_bias = g2.sum(0).to(bias_dtype) if need_bias else None
        return grad_x, grad_xa, grad_w, grad_bias, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """A Linear layer plus one or more low-rank updates, by composition.

    Args:
        base: the Linear to wrap; its `weight` and `bias` Parameters are taken over as they are
            (same objects, so ties and optimizer references survive).
        r: rank of the first adapter.
        alpha: its scaling numerator.
        dropout: dropout on the LoRA branch's input while training (no op at all when 0).
        init: "gaussian" (A ~ N(0, 0.02)) or "kaiming" (PEFT's kaiming-uniform); B starts at zero.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        name: the first adapter's name; "default" keeps it in `lora_A` / `lora_B`, any other
            name in `lora_adapters.<name>`.

    `adapters` maps each name to its AdapterSlot; `active_adapters` names those a forward adds.
    `r`, `alpha`, `scaling`, `use_rslora`, `init` and `config` are those of the layer's first
    adapter ("default" when it has one); each adapter's own are in `adapters[name]`.

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
        name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # The "default" adapter's modules (None while the layer has no adapter of that name).
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None
        self.adapters: dict[str, AdapterSlot] = {}
        self.active_adapters: tuple[str, ...] = ()
        self._active: list[AdapterSlot] = []  # the slots of active_adapters, for forward
        self.merged_adapters: tuple[str, ...] = ()
        self._merged: list[AdapterSlot] = []
        # The weight before merge(), restored by unmerge() (a plain attribute: not state).
        self._unmerged_weight: torch.Tensor | None = None
        self.merged = False
        self.enabled = True
        # Per-row routing of a mixed batch, set by mixed_adapters: [(slot, row indices)].
        self._routes: list[tuple[AdapterSlot, torch.Tensor]] | None = None
        self._route_rows = 0
        self.add_adapter(name, r, alpha, dropout, init, use_rslora)
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
    ) -> AdapterSlot:
        """Adds an adapter (B = 0, so the layer computes what it did); it is not made active.

        Returns:
            The new AdapterSlot.

        Raises:
            ValueError: on a bad or taken name, a bad init, or r > min(in_features, out_features).
        """
        _check_adapter_name(name)
        if name in self.adapters:
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
        low = w.dtype in _UPCAST_DTYPES or not w.dtype.is_floating_point
        lora_dtype = torch.float32 if low else w.dtype
        kw = {"bias": False, "device": w.device, "dtype": lora_dtype}
        lora_A = nn.Linear(self.in_features, r, **kw)
        lora_B = nn.Linear(r, self.out_features, **kw)
        if name == DEFAULT_ADAPTER:
            self.lora_A, self.lora_B = lora_A, lora_B
        else:
            if "lora_adapters" not in self._modules:
                self.lora_adapters = nn.ModuleDict()
            self.lora_adapters[name] = nn.ModuleDict({"lora_A": lora_A, "lora_B": lora_B})
        slot = AdapterSlot(
            name=name, lora_A=lora_A, lora_B=lora_B, r=r, alpha=float(alpha),
            scaling=_scaling(r, float(alpha), use_rslora), dropout=float(dropout),
            use_rslora=use_rslora, init=init,
        )
        self.adapters[name] = slot
        _reset(slot)
        return slot

    def delete_adapter(self, name: str) -> None:
        """Removes an adapter and its Parameters from this layer.

        Raises:
            ValueError: when the layer has no such adapter, or it is merged into `weight`.
        """
        if name not in self.adapters:
            raise ConfigError(f"no adapter {name!r} on this layer; it has {list(self.adapters)}")
        if name in self.merged_adapters:
            raise ConfigError(f"adapter {name!r} is merged into the weight; unmerge it first")
        del self.adapters[name]
        if name == DEFAULT_ADAPTER:
            self.lora_A = self.lora_B = None
        else:
            del self.lora_adapters[name]
            if not len(self.lora_adapters):
                del self.lora_adapters
        self.set_active([n for n in self.active_adapters if n != name])

    def set_active(self, names: Sequence[str]) -> None:
        """Makes the named adapters (those of them this layer has) the ones a forward adds.

        Raises:
            ValueError: when the layer is merged and the active set would change.
        """
        active = tuple(dict.fromkeys(n for n in names if n in self.adapters))
        if self.merged and active != self.active_adapters:
            raise ConfigError(
                f"adapters {list(self.merged_adapters)} are merged into the weight; unmerge "
                "before changing the active adapters"
            )
        self.active_adapters = active
        self._active = [self.adapters[n] for n in active]

    def _first(self) -> AdapterSlot:
        if not self.adapters:
            raise ConfigError("this LoRALinear has no adapters left")
        return self.adapters.get(DEFAULT_ADAPTER) or next(iter(self.adapters.values()))

    @property
    def r(self) -> int:
        return self._first().r

    @property
    def alpha(self) -> float:
        return self._first().alpha

    @property
    def scaling(self) -> float:
        return self._first().scaling

    @property
    def use_rslora(self) -> bool:
        return self._first().use_rslora

    @property
    def init(self) -> str:
        return self._first().init

    @property
    def config(self) -> LoraConfig | None:
        return self._first().config

    def reset_lora_parameters(self, init: str | None = None, name: str | None = None) -> None:
        """Re-initialises A (gaussian or kaiming; default: the adapter's own init) and zeroes B,
        so the update starts at zero. `name`: that adapter (default: every adapter)."""
        for slot in self.adapters.values() if name is None else [self.adapters[name]]:
            _reset(slot, init)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{s.name}(r={s.r}, scaling={s.scaling:g})" for s in self.adapters.values()
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters=[{adapters}], active={list(self.active_adapters)}, "
            f"merged={self.merged}, enabled={self.enabled}"
        )

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and not self.merged and self._routes is None and len(self._active) == 1:
            dt = self._fused_dtype(x)
            if dt is not None:  # the common case, training or not: one node, see _LoRAFunction
                slot = self._active[0]
                xa = None
                if slot.dropout > 0 and self.training:
                    xa = F.dropout(x, slot.dropout, training=True)
                return _LoRAFunction.apply(x, xa, self.weight, self.bias, slot.lora_A.weight,
                                           slot.lora_B.weight, slot.scaling, dt)
        y = base_output(self, x)  # (..., out); the quantized matmul on a QLoRA base
        if self._routes is not None:
            return self._forward_rows(x, y)
        # Merged + enabled: W already holds the update. Unmerged + disabled: base only.
        if self.enabled == self.merged:
            return y
        if self.enabled:
            for slot in self._active:
                y = self._add_update(x, y, slot, slot.scaling)
        else:  # merged + disabled subtracts the update again, without touching W
            for slot in self._merged:
                y = self._add_update(x, y, slot, -slot.scaling)
        return y

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype _LoRAFunction computes in, or None where the composed path must run
        (dtypes that F.linear itself would refuse, or that autocast leaves alone)."""
        w = self.weight
        if torch.is_autocast_enabled(x.device.type):
            # autocast leaves float64 alone; the composed path does the same
            low = w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            return torch.get_autocast_dtype(x.device.type) if low else None
        return w.dtype if x.dtype == w.dtype and w.dtype.is_floating_point else None

    def _add_update(
        self, x: torch.Tensor, y: torch.Tensor, slot: AdapterSlot, scale: float
    ) -> torch.Tensor:
        """y + scale * B A dropout(x), added into y's own memory when the dtypes allow."""
        if self.enabled and slot.dropout > 0 and self.training:
            x = F.dropout(x, slot.dropout, training=True)
        a, b = slot.lora_A.weight, slot.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != a.dtype and not autocast:
            x = x.to(a.dtype)
        h = F.linear(x, a).reshape(-1, slot.r)  # (N, r)
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

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each group of rows gets its own adapter's update (set by
        mixed_adapters); rows of no group, or of an adapter this layer lacks, get the base."""
        if self.merged:
            raise ConfigError(
                f"a mixed batch (adapter_names per row) needs unmerged adapters, but "
                f"{list(self.merged_adapters)} are merged; call unmerge_lora(model) first"
            )
        if x.dim() < 3 or x.shape[0] != self._route_rows:
            raise ConfigError(
                f"a mixed batch of {self._route_rows} rows needs every LoRA layer input shaped "
                f"(batch, sequence, features), got {tuple(x.shape)} (layers that see tokens "
                "regrouped, such as MoE experts, cannot route rows)"
            )
        if not self.enabled:
            return y
        autocast = torch.is_autocast_enabled(x.device.type)
        for slot, rows in self._routes:
            xs = x.index_select(0, rows)  # (n, T, in)
            if slot.dropout > 0 and self.training:
                xs = F.dropout(xs, slot.dropout, training=True)
            a, b = slot.lora_A.weight, slot.lora_B.weight
            if xs.dtype != a.dtype and not autocast:
                xs = xs.to(a.dtype)
            delta = F.linear(F.linear(xs, a), b)  # (n, T, out)
            # Into y's own memory (a copy of y per adapter would cost more than the update);
            # safe for autograd as in _add_update: linear's backward does not read its output.
            y.index_add_(0, rows, delta.to(y.dtype), alpha=slot.scaling)
        return y

    # ------------------------------------------------------------ merging

    @torch.no_grad()
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """Returns scaling * B @ A in float32, shaped like `weight`: of adapter `name`, or
        summed over the active adapters (name=None)."""
        slots = self._active if name is None else [self.adapters[name]]
        return _delta(slots, self.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the active adapters' updates into `weight` (computed in float32); a no-op when
        already merged or when no adapter is active.

        The weight before the merge is kept (a copy as large as `weight`, held until
        `unmerge`), so unmerging gives back exactly the base: W + d - d rounds differently
        from W, and a drifted base would change its fingerprint.
        """
        if self.merged or not self._active:
            return
        if is_quantized(self.weight):
            raise ConfigError(
                f"cannot merge LoRA into a {quant_kind(self.weight)}-quantized base weight (the "
                "update would be rounded away); merge the adapter into the full-precision base "
                "instead (minilora merge --model BASE --adapter DIR)")
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.weight.float() + _delta(self._active, self.weight))
        self.merged_adapters, self._merged = self.active_adapters, list(self._active)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Puts back the weight as it was before `merge`, bit for bit; a no-op when not
        merged."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters, self._merged = (), []
        self.merged = False

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


def _reset(slot: AdapterSlot, init: str | None = None) -> None:
    with torch.no_grad():
        if (init or slot.init) == "gaussian":
            nn.init.normal_(slot.lora_A.weight, mean=0.0, std=0.02)
        else:
            nn.init.kaiming_uniform_(slot.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(slot.lora_B.weight)


def _delta(slots: list[AdapterSlot], like: torch.Tensor) -> torch.Tensor:
    """sum of scaling * B @ A over slots, float32, shaped like `like`."""
    total = None
    for slot in slots:
        b, a = slot.lora_B.weight.float(), slot.lora_A.weight.float()
        delta = (b @ a).mul_(slot.scaling)
        total = delta if total is None else total.add_(delta)
    if total is None:
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return total


@dataclass
class InjectionReport:
    """What `inject_lora` did.

    Attributes:
        modules: (name, in_features, out_features) of every adapted Linear, in model order.
        lora_parameters: number of LoRA parameters added, sum of r * (in + out).
        adapter: the name of the adapter injected.
    """

    modules: list[tuple[str, int, int]]
    lora_parameters: int
    adapter: str = DEFAULT_ADAPTER

    def __str__(self) -> str:
        lines = [f"{name}: {i} -> {o}" for name, i, o in self.modules]
        lines.append(
            f"{len(self.modules)} modules, {self.lora_parameters:,} LoRA parameters "
            f"(adapter {self.adapter!r})"
        )
        return "\n".join(lines)


@dataclass
class ParameterCounts:
    """Parameter counts as the seed prints them (shared Parameters counted once).

    `lora` counts every adapter's Parameters, active or not; `trainable` those that require grad.
    """

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
        _check_every_suffix_matches(targets, [n for n, _ in linears])
        chosen = [(n, m) for n, m in linears if _matches(n, targets)]
    if config.exclude:
        chosen = [(n, m) for n, m in chosen if not _matches(n, config.exclude)]
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "(none)"
        raise ConfigError(
            f"LoRA targets {config.targets!r} (exclude {config.exclude!r}) match no Linear "
            f"module; the model's Linear modules are: {names}"
        )
    return chosen


def _check_every_suffix_matches(targets: list[str] | str, names: list[str]) -> None:
    """A listed suffix that matches no Linear is a typo (``v_prj``): an error naming each, with
    the nearest real names, rather than a run that silently adapts the others only."""
    if isinstance(targets, str):
        return  # a regex
    missing = [t for t in targets if not any(_matches(n, [t]) for n in names)]
    if not missing:
        return
    import difflib

    # The distinct last parts (q_proj, lm_head, ...): a short list, not every layer's path.
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    hints = []
    for t in missing:
        near = difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.5)
        hints.append(f"{t!r} (nearest: {', '.join(near) or 'none'})")
    raise ConfigError(
        f"LoRA targets {hints[0] if len(hints) == 1 else ', '.join(hints)} match no Linear "
        f"module; the model's Linear names end in: {', '.join(suffixes) or '(none)'}"
    )


def inject_lora(
    model: nn.Module, config: LoraConfig, name: str = DEFAULT_ADAPTER
) -> InjectionReport:
    """Adds adapter `name` to the targeted Linear modules of `model`, in place.

    A Linear becomes a LoRALinear; a layer that already has LoRA gets the adapter beside its
    others. The new adapter becomes the only active one (B starts at zero, so the model then
    computes the base); `set_active` changes that.

    Args:
        model: any nn.Module (a transformers model included).
        config: rank, scaling, targets and init.
        name: the adapter's name ("default": the keys stay `<path>.lora_A.weight`).

    Returns:
        An InjectionReport naming the adapted modules and the number of LoRA parameters.

    Raises:
        ValueError: when the targets match no Linear (the message lists those the model has),
            match a layer that already has an adapter of this name, r exceeds min(in, out) of a
            target, the name is not valid, or the model's LoRA is merged. Nothing is changed
            when it raises.
    """
    _check_adapter_name(name)
    chosen = _select(model, config)
    twice = [n for n, m in chosen if isinstance(m, LoRALinear) and name in m.adapters]
    if twice:
        raise ConfigError(
            f"these layers already have LoRA adapter {name!r} (inject once per layer and name; "
            f"another name adds a second adapter): {twice}"
        )
    _refuse_merged(model, "adding an adapter")
    too_small = [
        f"{n} ({m.in_features} -> {m.out_features})"
        for n, m in chosen
        if config.r > min(m.in_features, m.out_features)
    ]
    if too_small:
        raise ConfigError(
            f"r={config.r} is larger than min(in_features, out_features) of: {too_small}"
        )
    modules = []
    added = 0
    for path, linear in chosen:
        if isinstance(linear, LoRALinear):
            linear.add_adapter(
                name, config.r, config.alpha, config.dropout, config.init, config.use_rslora
            )
            lora = linear
        else:
            lora = LoRALinear(
                linear, config.r, config.alpha, config.dropout, config.init, config.use_rslora,
                name=name,
            )
            lora.train(linear.training)
            _set_submodule(model, path, lora)
        lora.adapters[name].config = config
        modules.append((path, linear.in_features, linear.out_features))
        added += config.r * (linear.in_features + linear.out_features)
    set_active(model, [name])
    _install_row_hooks(model)
    return InjectionReport(modules=modules, lora_parameters=added, adapter=name)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _refuse_merged(model: nn.Module, doing: str) -> None:
    merged = [n for n, m in lora_modules(model) if m.merged]
    if merged:
        raise ConfigError(
            f"{doing} needs unmerged adapters, but LoRA is merged into {merged[:3]}"
            f"{'...' if len(merged) > 3 else ''}; call unmerge_lora(model) first"
        )


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Returns (name, module) of every LoRALinear in `model` (found by type), in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def list_adapters(model: nn.Module) -> list[str]:
    """Returns the names of the adapters `model` holds, in the order they were added."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """Returns the names of the adapters a forward of `model` adds (empty: the base)."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.active_adapters))
    return list(names)


def _known(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; the model has {known or 'none'}")


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Chooses which adapters a forward adds: one name, several (their updates add up), or
    None / [] / "base" for the base model alone.

    Training follows: `mark_trainable` and `lora_parameters` take the active adapters only.

    Raises:
        ValueError: on an unknown name (the message lists the model's adapters), or when LoRA
            is merged (unmerge_lora first).
    """
    if names is None:
        names = []
    elif isinstance(names, str):
        names = [names]
    names = [n for n in dict.fromkeys(names) if n != BASE_ROW]
    _known(model, names)
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules) and names != active_adapters(model):
        _refuse_merged(model, "changing the active adapters")
    for m in modules:
        m.set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter `name` from every layer; a layer left with no adapter becomes a plain
    nn.Linear again (sharing the base Parameters). The other adapters are untouched.

    Raises:
        ValueError: on an unknown name, or when that adapter is merged.
    """
    _known(model, [name])
    merged = [n for n, m in lora_modules(model) if name in m.merged_adapters]
    if merged:
        raise ConfigError(
            f"adapter {name!r} is merged into {merged[:3]}; call unmerge_lora(model) first"
        )
    for path, m in lora_modules(model):
        if name not in m.adapters:
            continue
        m.delete_adapter(name)
        if not m.adapters and m is not model:
            _set_submodule(model, path, m.to_linear())
    if not lora_modules(model):
        _remove_row_hooks(model)


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Returns LoRA A and B Parameters: the list to give the optimizer.

    Args:
        model: a model with LoRA.
        name: that adapter's Parameters; None: the active adapters' (a single adapter's by
            default).
    """
    params = []
    for _, m in lora_modules(model):
        if name is None:
            slots = m._active
        else:
            slots = [m.adapters[name]] if name in m.adapters else []
        for slot in slots:
            params += slot.parameters()
    return params


def mark_trainable(model: nn.Module) -> None:
    """Freezes every Parameter of `model` except those of the active adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Returns total, trainable and LoRA parameter counts (works on meta tensors too)."""
    params = list(model.parameters())  # deduplicated: tied weights count once
    lora = [p for _, m in lora_modules(model) for s in m.adapters.values() for p in s.parameters()]
    return ParameterCounts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        lora=sum(p.numel() for p in lora),
    )


def merge_lora(model: nn.Module) -> None:
    """Merges the active adapters of every LoRALinear of `model` (idempotent).

    Raises:
        ValueError: when a layer to merge into shares its weight with another module (a tied
            lm_head / embed_tokens): the merge would change that module too. Nothing is merged.
    """
    _refuse_shared_weights(model)
    for _, m in lora_modules(model):
        m.merge()


def _refuse_shared_weights(model: nn.Module) -> None:
    """Raises when a layer with something to merge holds a weight that other names share.

    LoRALinear.merge cannot check this itself: only the model sees who else holds the weight.
    """
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    shared = []
    for path, m in lora_modules(model):
        if m.merged or not m._active:
            continue
        own = f"{path}.weight" if path else "weight"
        others = [n for n in holders.get(id(m.weight), []) if n != own]
        if others:
            shared.append(f"{path or 'the model'} (its weight is also {', '.join(others)})")
    if shared:
        raise ConfigError(
            f"cannot merge LoRA into a weight that another module shares: {'; '.join(shared)}; "
            "merging would change that module too (a tied embedding, say). Keep the adapter "
            "unmerged, or untie the weight first"
        )


def unmerge_lora(model: nn.Module) -> None:
    """Unmerges every LoRALinear of `model` (idempotent)."""
    for _, m in lora_modules(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds the active adapters into the base weights and puts plain nn.Linear modules back
    (inactive adapters are dropped).

    Returns:
        `model` itself (changed in place), or a new nn.Linear when `model` is a LoRALinear.

    Raises:
        ValueError: when a layer to merge into shares its weight with another module (a tied
            lm_head / embed_tokens). Nothing is changed.
    """
    if isinstance(model, LoRALinear):
        return model.to_linear()
    _refuse_shared_weights(model)
    for name, m in lora_modules(model):
        _set_submodule(model, name, m.to_linear())
    _remove_row_hooks(model)
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


# ---------------------------------------------------------------- mixed batches


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter `adapter_names[i]` alone (None or
    "base": the base model), whatever `set_active` says.

    `model(input_ids, adapter_names=[...])` does the same for one call (inject_lora installs
    the hook that reads the keyword). Each row computes what it computes alone with its adapter
    active, up to float rounding. Every LoRA layer's input must be (batch, sequence, features):
    layers that see regrouped tokens (MoE experts) cannot route rows, and say so.

    Raises:
        ValueError: on an unknown adapter name, an empty list, LoRA that is merged, or when a
            mixed batch is already being routed.
    """
    modules = _route(model, adapter_names)
    try:
        yield model
    finally:
        _unroute(modules)


def _route(model: nn.Module, adapter_names: Sequence[str | None]) -> list[LoRALinear]:
    """Sets each LoRA layer's per-row routing; returns the layers (for _unroute)."""
    names = list(adapter_names)
    if not names:
        raise ConfigError("adapter_names is empty: give one adapter name (or None) per row")
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ConfigError("adapter_names given, but the model has no LoRA adapters")
    _known(model, [n for n in names if n is not None and n != BASE_ROW])
    _refuse_merged(model, "a mixed batch (adapter_names per row)")
    if any(m._routes is not None for m in modules):
        raise ConfigError("a mixed batch is already being routed (mixed_adapters is not nested)")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None and name != BASE_ROW:
            groups.setdefault(name, []).append(row)
    indices: dict[tuple[str, torch.device], torch.Tensor] = {}
    for m in modules:
        routes = []
        for name, rows in groups.items():
            if name in m.adapters:
                key = (name, m.weight.device)
                if key not in indices:
                    indices[key] = torch.tensor(rows, dtype=torch.long, device=key[1])
                routes.append((m.adapters[name], indices[key]))
        m._routes, m._route_rows = routes, len(names)
    return modules


def _unroute(modules: list[LoRALinear]) -> None:
    for m in modules:
        m._routes = None


_HOOKS = "_minilora_row_hooks"


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is not None:
        module._minilora_routed = _route(module, names)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, output: object) -> None:
    # Plain attribute reads and writes (no dict pops): torch.compile replays them faithfully.
    routed = getattr(module, "_minilora_routed", None)
    if routed is not None:
        _unroute(routed)
        module._minilora_routed = None


def _install_row_hooks(model: nn.Module) -> None:
    """Lets `model(..., adapter_names=[...])` route rows, without the model knowing of LoRA:
    a pre-hook takes the keyword away and sets the routing, a hook that runs even when the
    forward raises clears it."""
    if isinstance(model, LoRALinear) or _HOOKS in model.__dict__:
        return
    pre = model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    post = model.register_forward_hook(_post_forward, always_call=True)
    model.__dict__[_HOOKS] = (pre, post)


def _remove_row_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS, ()):
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
        ValueError: on unknown adapters, a taken or bad name, an unknown method, a rank the
            layers cannot hold, or merged LoRA.
    """
    _check_adapter_name(name)
    if method not in COMBINE_METHODS:
        raise ConfigError(f"method must be one of {COMBINE_METHODS}, got {method!r}")
    if not weights:
        raise ConfigError("weights is empty: give adapter name -> weight")
    for adapter, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(
                weight):
            raise ConfigError(f"weights[{adapter!r}]: expected a finite number, got {weight!r}")
    _known(model, list(weights))
    if name in list_adapters(model):
        raise ConfigError(
            f"adapter {name!r} exists already; delete_adapter it or pick another name")
    _refuse_merged(model, "combine_adapters")
    modules = [(p, m) for p, m in lora_modules(model) if any(n in m.adapters for n in weights)]
    # Each adapter owns a fixed block of rows, so the concatenation has one rank everywhere
    # (what a PEFT file needs); a layer without that adapter keeps its block at zero.
    width = {n: max(m.adapters[n].r for _, m in modules if n in m.adapters) for n in weights}
    total = sum(width.values())
    if method == "linear" and r is not None and r != total:
        raise ConfigError(f"r={r}: method='linear' has the sum of the ranks ({total}); "
                         "use method='svd' for another rank")
    rank = total if method == "linear" or r is None else r
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"r must be an integer >= 1, got {r!r}")
    too_small = [f"{p} ({m.in_features} -> {m.out_features})" for p, m in modules
                 if rank > min(m.in_features, m.out_features)]
    if too_small:
        hint = "; use method='svd' with a smaller r" if method == "linear" else ""
        raise ConfigError(f"rank {rank} is larger than min(in, out) of {too_small}{hint}")
    errors: dict[str, float] = {}
    new: list[tuple[LoRALinear, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for path, m in modules:
            if method == "linear":
                a, b = _concatenated(m, weights, width, total)
                errors[path] = 0.0
            else:
                a, b, errors[path] = _truncated_svd(m, weights, rank)
            new.append((m, a, b))
        config = LoraConfig(r=rank, alpha=float(rank), targets=[p for p, _ in modules])
        for m, a, b in new:
            slot = m.add_adapter(name, rank, float(rank))
            slot.lora_A.weight.copy_(a)
            slot.lora_B.weight.copy_(b)
            slot.config = config
    set_active(model, [name])
    return CombineReport(adapter=name, method=method, r=rank, errors=errors)


def _concatenated(
    m: LoRALinear, weights: Mapping[str, float], width: dict[str, int], total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, w_2 s_2 B_2, ...] in float32: B A = sum w_i s_i B_i A_i."""
    a = torch.zeros(total, m.in_features, device=m.weight.device)  # (R, in)
    b = torch.zeros(m.out_features, total, device=m.weight.device)  # (out, R)
    start = 0
    for n, w in weights.items():
        if n in m.adapters:
            slot = m.adapters[n]
            a[start:start + slot.r] = slot.lora_A.weight.float()
            b[:, start:start + slot.r] = slot.lora_B.weight.float() * (w * slot.scaling)
        start += width[n]
    return a, b


def _truncated_svd(
    m: LoRALinear, weights: Mapping[str, float], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (Eckart-Young) of the weighted sum of updates, and the
    relative Frobenius error of that approximation."""
    delta = torch.zeros(m.out_features, m.in_features, device=m.weight.device)  # (out, in)
    for n, w in weights.items():
        if n in m.adapters:
            delta += w * m.delta_weight(n)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # (out, rank)
    a = root[:, None] * vh[:rank]  # (rank, in)
    norm = torch.linalg.matrix_norm(delta)
    error = torch.linalg.matrix_norm(delta - b @ a) / norm if norm > 0 else norm
    return a, b, float(error)


check_adapter_name = _check_adapter_name
