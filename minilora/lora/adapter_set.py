"""What every LoRA layer does with its named adapters, whatever it wraps: the settings recorded
per name, the active set, deletion. LoRALinear (minilora.lora.layer) and LoRAEmbedding
(minilora.lora.embedding) both take it; each declares the state in its own ``__init__`` and
computes its own update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from minilora.core.errors import ConfigError, MergeError
from minilora.lora.config import LoraConfig, lora_scaling
from minilora.lora.variants import LoraVariant

# Low-precision weights get float32 adapters (PEFT does the same): bf16 optimizer updates of a
# zero-initialised B would round away.
UPCAST_DTYPES = (torch.float16, torch.bfloat16)

if TYPE_CHECKING:
    # What a layer's dicts hold, for the type checker only: at run time they are the plain
    # nn.ModuleDict / nn.ParameterDict, whose items type as Module / Any.
    class AdapterLinear(nn.Linear):
        weight: nn.Parameter

    class LinearDict(nn.ModuleDict):
        def __getitem__(self, key: str) -> AdapterLinear: ...

    class ParameterDict(nn.ParameterDict):
        def __getitem__(self, key: str) -> nn.Parameter: ...
else:
    LinearDict = nn.ModuleDict
    ParameterDict = nn.ParameterDict


class AdapterSet:
    """The named-adapter bookkeeping a LoRA layer shares (a mixin of an nn.Module)."""

    if TYPE_CHECKING:  # declared by the layer's __init__
        lora_A: Any
        lora_B: Any
        r: dict[str, int]
        lora_alpha: dict[str, float]
        scaling: dict[str, float]
        lora_dropout: dict[str, float]
        use_rslora: dict[str, bool]
        init: dict[str, str]
        variant: dict[str, LoraVariant]
        lora_config: dict[str, LoraConfig | None]
        merged_adapters: tuple[str, ...]
        active_adapters: tuple[str, ...]
        weight: torch.Tensor
        _unmerged_weight: torch.Tensor | None

        def delta_weight(self, name: str | None = None) -> torch.Tensor: ...

    @property
    def merged(self) -> bool:
        """Whether adapters are folded into `weight` (see merge)."""
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The names of this layer's adapters, in the order they were added."""
        return tuple(self.lora_A.keys())

    def _record(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool,
                init: str, config: LoraConfig | None, variant: LoraVariant) -> None:
        """Records adapter `name`'s settings (its A and B are the layer's to make)."""
        self.r[name], self.lora_alpha[name] = r, float(alpha)
        self.scaling[name] = lora_scaling(r, float(alpha), use_rslora)
        self.lora_dropout[name], self.use_rslora[name] = float(dropout), use_rslora
        self.init[name], self.lora_config[name] = init, config
        self.variant[name] = variant

    def _forget(self, name: str) -> None:
        """Removes adapter `name`'s A, B and settings (the layer drops what else it keeps).

        Raises:
            ConfigError: when the layer has no such adapter, or it is merged into `weight`.
        """
        if name not in self.lora_A:
            raise ConfigError(f"no adapter {name!r} on this layer; it has {list(self.lora_A)}")
        if name in self.merged_adapters:
            raise ConfigError(f"adapter {name!r} is merged into the weight; unmerge it first")
        del self.lora_A[name], self.lora_B[name]
        for settings in (self.r, self.lora_alpha, self.scaling, self.lora_dropout,
                         self.use_rslora, self.init, self.variant, self.lora_config):
            del settings[name]

    def set_active(self, names: Sequence[str]) -> None:
        """Makes the named adapters (those of them this layer has) the ones a forward adds.

        Raises:
            ConfigError: when the layer is merged and the active set would change.
        """
        active = tuple(dict.fromkeys(n for n in names if n in self.lora_A))
        if self.merged and active != self.active_adapters:
            raise ConfigError(
                f"adapters {list(self.merged_adapters)} are merged into the weight; unmerge "
                "before changing the active adapters")
        self.active_adapters = active

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """[A, B] of adapter `name` (and a variant's own, where the layer adds them)."""
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    # ------------------------------------------------------------ merging

    def _merge_target(self) -> str:
        """The merged tensor as an error names it (the layer says what it wraps)."""
        return f"weight {tuple(self.weight.shape)}"

    def _check_mergeable(self) -> None:
        """Raises when the layer cannot take a merge at all (a quantized weight)."""

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the active adapters' updates into `weight` (in float32), keeping the weight
        before the merge for `unmerge`; a no-op when merged already or nothing is active.

        Raises:
            ConfigError: a weight that cannot take a merge (a quantized one).
            MergeError: the merged weight would hold inf or NaN; nothing is changed.
        """
        if self.merged or not self.active_adapters:
            return
        self._check_mergeable()
        merged = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        if not torch.isfinite(merged).all():
            raise MergeError(
                f"merging adapters {list(self.active_adapters)} would put inf or NaN into the "
                f"{self._merge_target()}; the adapter is broken or too large for its dtype. "
                "Nothing was merged")
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged_adapters = self.active_adapters

    @torch.no_grad()
    def unmerge(self) -> None:
        """Puts back the weight as it was before `merge`, bit for bit; a no-op when not
        merged."""
        if not self.merged:
            return
        assert self._unmerged_weight is not None  # merge() keeps it while merged
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = ()
