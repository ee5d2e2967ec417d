"""LoRA on an embedding table: `LoRAEmbedding`, its forward, its merge.

PEFT's LoRA for nn.Embedding, matched in behaviour: per adapter an A of shape
(r, num_embeddings) and a B of shape (embedding_dim, r); a lookup of token ids gives
base[ids] + scaling * A.T[ids] @ B.T, so merging adds scaling * (B A).T to the
(num_embeddings, embedding_dim) table. A starts at zero and B normal (PEFT's start for an
embedding, whatever the Linear init), so the output is the base's at first and A moves first.
PEFT applies no dropout on an embedding's LoRA, and neither does this layer (its `lora_dropout`
is kept only so the adapter's settings read back).

Like minilora.lora.layer.LoRALinear, the layer wraps by composition (it owns the base table's
`weight` under its own name, so base state_dict keys and a tied output head keep pointing at
the same Parameter) and keys adapters by name in one ModuleDict per kind: `lora_A[name]` is a
bias-free nn.Linear(num_embeddings, r) whose weight is PEFT's lora_embedding_A, `lora_B[name]`
an nn.Linear(r, embedding_dim) whose weight is PEFT's lora_embedding_B. A tied output head
keeps the base table: the update changes the lookup only, as in PEFT (without its
`ensure_weight_tying`).

Not supported on an embedding, refused by name: DoRA, PiSSA, a quantized table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilora.core.errors import ConfigError
from minilora.lora.adapter_set import UPCAST_DTYPES, AdapterSet, LinearDict, ParameterDict
from minilora.lora.config import DEFAULT_ADAPTER, LoraConfig, check_adapter_name
from minilora.lora.routes import Routes
from minilora.lora.variants import LoraVariant


def refuse_embedding_config(init: str, use_dora: bool, path: str) -> None:
    """Raises ConfigError when an adapter's settings ask for something an embedding's LoRA does
    not do.

    Raises:
        ConfigError: DoRA or PiSSA on the embedding `path`.
    """
    if use_dora:
        raise ConfigError(f"LoRA on the embedding {path}: DoRA is not supported on an "
                          "embedding; leave the embedding out of the targets or turn DoRA off")
    if init == "pissa":
        raise ConfigError(f"LoRA on the embedding {path}: the PiSSA init is not supported on an "
                          "embedding; leave the embedding out of the targets or use another init")


class LoRAEmbedding(AdapterSet, nn.Module):
    """An nn.Embedding plus one or more named low-rank updates, by composition.

    Args:
        base: the Embedding to wrap; its `weight` Parameter is taken over as it is (the same
            object, so a tied output head still shares it).
        r: rank of the first adapter.
        alpha: its scaling numerator.
        dropout: recorded with the adapter's settings, not applied (PEFT applies none here).
        init: the adapter's init name, recorded (any init starts an embedding's A at zero and
            B normal, as PEFT does); "pissa" is refused.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        name: the first adapter's name.

    Per adapter name: `lora_A[name]` (weight (r, num_embeddings)), `lora_B[name]` (weight
    (embedding_dim, r)), and the plain dicts `r`, `lora_alpha`, `scaling`, `lora_dropout`
    (kept, never applied), `use_rslora`, `init`, `variant` (always plain LoRA), `lora_config`
    and `pissa_from` (always empty). `in_features` / `out_features` are num_embeddings /
    embedding_dim, A's input and B's output, so rank checks read alike on both kinds of layer.
    `lora_magnitude_vector` is empty (no DoRA here). `routes`, `quantized_from` and
    `sharded_from` mean what they mean on LoRALinear.

    Raises:
        ConfigError: r larger than min(num_embeddings, embedding_dim), or a quantized table.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False,
                 name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        if not base.weight.dtype.is_floating_point:
            raise ConfigError(f"LoRA on an embedding needs a floating-point table, got "
                              f"{base.weight.dtype}; load the base unquantized")
        self.num_embeddings = self.in_features = base.num_embeddings
        self.embedding_dim = self.out_features = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        self.weight = base.weight
        self.bias: torch.Tensor | None = None  # read by PEFT base-layer checks; a table has none
        self.lora_A = LinearDict()
        self.lora_B = LinearDict()
        self.lora_magnitude_vector = ParameterDict()  # DoRA is refused: stays empty
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self.variant: dict[str, LoraVariant] = {}
        self.lora_config: dict[str, LoraConfig | None] = {}
        self.pissa_from: dict[str, str] = {}
        self.routes: Routes | None = None
        self.quantized_from: dict[str, Any] | None = None
        self.sharded_from: dict[str, Any] | None = None
        self._active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self._unmerged_weight: torch.Tensor | None = None
        self.enabled = True
        self.add_adapter(name, r, alpha, dropout, init, use_rslora)
        self.set_active([name])

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The names of the adapters a forward adds, in order."""
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: Sequence[str]) -> None:
        self._active_adapters = tuple(names)

    # ------------------------------------------------------------ adapters

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0,
                    init: str = "kaiming", use_rslora: bool = False,
                    config: LoraConfig | None = None, use_dora: bool = False) -> None:
        """Adds an adapter that leaves the lookup as it was (A = 0, B ~ N(0, 1), PEFT's start);
        it is not made active. `dropout` is recorded, not applied (PEFT applies none here).

        Raises:
            ConfigError: a bad or taken name, r > min(num_embeddings, embedding_dim), DoRA or
                PiSSA.
        """
        check_adapter_name(name)
        if name in self.lora_A:
            raise ConfigError(f"this embedding already has an adapter named {name!r}")
        refuse_embedding_config(init, use_dora, "layer")
        if not 1 <= r <= min(self.num_embeddings, self.embedding_dim):
            raise ConfigError(
                f"r={r} must be between 1 and min(num_embeddings, embedding_dim) = "
                f"min({self.num_embeddings}, {self.embedding_dim})")
        w = self.weight
        dtype = torch.float32 if w.dtype in UPCAST_DTYPES else w.dtype
        a = nn.Linear(self.num_embeddings, r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(r, self.embedding_dim, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(a.weight)  # (r, num_embeddings)
            nn.init.normal_(b.weight)  # (embedding_dim, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self._record(name, r, alpha, dropout, use_rslora, init, config, LoraVariant())

    def delete_adapter(self, name: str) -> None:
        """Removes an adapter and its Parameters from this layer.

        Raises:
            ConfigError: when the layer has no such adapter, or it is merged into `weight`.
        """
        self._forget(name)
        self.set_active([n for n in self.active_adapters if n != name])

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.r[n]}, scaling={self.scaling[n]:g})"
                             for n in self.lora_A)
        return (f"{self.num_embeddings}, {self.embedding_dim}, adapters=[{adapters}], "
                f"active={list(self.active_adapters)}, merged={self.merged}, "
                f"enabled={self.enabled}")

    # ------------------------------------------------------------ forward

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """A lookup in `table` with the base embedding's own options."""
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The base lookup plus each active adapter's update (the base alone when disabled;
        the table before merge when merged and disabled).

        Raises:
            ValueError: a mixed batch (see `routes`) whose ids are not (batch, sequence) with
                one row per routed row.
        """
        if self.merged and not self.enabled:
            assert self._unmerged_weight is not None  # merge() keeps it while merged
            return self._embed(ids, self._unmerged_weight)
        y = self._embed(ids, self.weight)  # (..., C)
        if not self.enabled or self.merged:
            return y
        if self.routes is not None:
            return self._routed(ids, y)
        for name in self.active_adapters:
            y = y + self.lora_update(ids, name).to(y.dtype)
        return y

    def lora_update(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` adds to the lookup of `ids`: scaling * A.T[ids] @ B.T,
        (..., embedding_dim)."""
        a = self.lora_A[name].weight  # (r, V)
        b = self.lora_B[name].weight  # (C, r)
        return (self._embed(ids, a.T) @ b.T) * self.scaling[name]  # (..., C)

    def _routed(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each group of rows gets its own adapter's update; rows of no group,
        or of an adapter this layer lacks, keep the base lookup."""
        assert self.routes is not None  # forward calls this only for a mixed batch
        n_rows = self.routes.n_rows
        if ids.dim() < 2 or ids.shape[0] != n_rows:
            raise ValueError(f"a mixed batch of {n_rows} rows needs token ids shaped (batch, "
                             f"sequence), got {tuple(ids.shape)}")
        for name, rows in self.routes.groups:
            delta = self.lora_update(ids.index_select(0, rows), name)
            # into the lookup's own memory: embedding's backward does not read its output
            y.index_add_(0, rows, delta.to(y.dtype))
        return y

    # ------------------------------------------------------------ merging

    @torch.no_grad()
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """Returns what merging adds to `weight` (num_embeddings, embedding_dim), in float32: of
        adapter `name`, or summed over the active adapters (name=None)."""
        w = self.weight if self._unmerged_weight is None else self._unmerged_weight
        total = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for n in self.active_adapters if name is None else [name]:
            b, a = self.lora_B[n].weight.float(), self.lora_A[n].weight.float()
            total += (b @ a).T * self.scaling[n]  # (C, r) @ (r, V) -> (V, C)
        return total

    def _merge_target(self) -> str:
        return f"embedding ({self.num_embeddings} x {self.embedding_dim})"

    def to_embedding(self) -> nn.Embedding:
        """Returns a plain nn.Embedding looking up base + the active adapters' update (merges
        them first, shares the Parameter); inactive adapters are dropped."""
        self.merge()
        self._unmerged_weight = None
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse,
                           device="meta")
        emb.weight = self.weight
        return emb
