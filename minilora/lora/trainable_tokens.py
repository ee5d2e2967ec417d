"""Trainable tokens: only chosen rows of an embedding train (PEFT's ``trainable_token_indices``).

`TrainableTokens` wraps an `nn.Embedding` (or a bias-free `nn.Linear` output head) by
composition: it owns the base `weight` under its own name (a model's base state_dict keys do not
change) and keeps, per adapter name, the new values of the chosen rows,
``trainable_tokens_delta[name]`` (k, dim), and their ids, ``token_indices[name]``. Despite
PEFT's name the "delta" holds the rows' values, not a difference: the forward uses
``W.index_copy(0, ids, delta)``, and the rows start as the base's own.

A head tied to the embedding (one weight, ``tie_word_embeddings``) gets a `TrainableTokens` that
reads the embedding's rows: PEFT does the same, so the output logits of the chosen tokens change
with their input rows, and only the embedding's rows are saved.

Which modules get the rows, and checking the ids against the vocabulary, is `add_trainable_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minilora.core.errors import ConfigError
from minilora.lora.adapter_set import UPCAST_DTYPES  # float32 rows, as LoRA's A and B
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.routes import Routes
from minilora.lora.saved_modules import SavedModule, modules_outside_lora

# In the name of every module inside a module to save's copies (never the base's own layers).
COPIES = ".modules_to_save."
# PEFT's name of the wrapper's inner adapter, part of the keys in its files.
TOKEN_ADAPTER = "token_adapter"
DELTA = "trainable_tokens_delta"


class TrainableTokens(nn.Module):
    """An embedding (or tied head) whose chosen rows train, per named adapter.

    Args:
        base: the `nn.Embedding`, or a bias-free `nn.Linear` whose weight is (vocab, dim); its
            `weight` Parameter is taken over as it is (same object: ties survive).
        tied_to: for a head that shares its weight with an embedding: that embedding's
            TrainableTokens, whose rows this one reads (it holds none of its own).

    `active_adapters` names the adapters a forward applies (their ids must not overlap);
    `enabled` False computes the base; `merged_adapters` those written into the weight.
    """

    def __init__(self, base: nn.Embedding | nn.Linear, tied_to: TrainableTokens | None = None
                 ) -> None:
        super().__init__()
        if isinstance(base, nn.Linear) and base.bias is not None:
            raise TypeError("TrainableTokens wraps a head without bias")
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise TypeError(f"TrainableTokens wraps nn.Embedding or nn.Linear, got "
                            f"{type(base).__name__}")
        self.weight = base.weight  # (vocab, dim)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.in_features: int = base.weight.shape[1]  # as a head: dim -> vocab
        self.out_features: int = base.weight.shape[0]
        if isinstance(base, nn.Embedding):
            self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
            self.padding_idx, self.max_norm = base.padding_idx, base.max_norm
            self.norm_type, self.scale_grad_by_freq = base.norm_type, base.scale_grad_by_freq
            self.sparse = base.sparse
        else:
            self.bias = None
        # A tied head reads its embedding's rows; kept in a tuple so it is no submodule (the
        # rows are saved once, under the embedding).
        self._tied: tuple[TrainableTokens, ...] = (tied_to,) if tied_to is not None else ()
        self.trainable_tokens_delta = nn.ParameterDict()
        self._indices: dict[str, list[int]] = {}
        self.active_adapters: list[str] = []
        self.enabled = True
        self.merged_adapters: list[str] = []
        self._originals: dict[str, torch.Tensor] = {}  # rows a merge replaced, for unmerge
        self._index: dict[str, torch.Tensor] = {}  # the ids as a tensor, on the weight's device
        # a mixed batch's rows per adapter for the current call (minilora.lora.named), else None
        self.routes: Routes | None = None

    @property
    def tied_to(self) -> TrainableTokens | None:
        """The embedding's TrainableTokens this (head) one reads, or None."""
        return self._tied[0] if self._tied else None

    @property
    def adapters(self) -> list[str]:
        """The adapter names this layer has rows for."""
        source = self.tied_to or self
        return list(source._indices)

    def token_indices(self, name: str) -> list[int]:
        """The token ids adapter `name` trains."""
        return (self.tied_to or self)._indices[name]

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """`token_indices(name)` as a (k,) long tensor on `device`, made once per device (not
        a host-to-device copy per forward)."""
        idx = self._index.get(name)
        if idx is None or idx.device != device:
            idx = torch.tensor(self.token_indices(name), dtype=torch.long, device=device)
            self._index[name] = idx
        return idx

    def delta(self, name: str) -> nn.Parameter:
        """Adapter `name`'s rows (k, dim): the new values of `token_indices(name)`."""
        return (self.tied_to or self).trainable_tokens_delta[name]

    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        """Adds adapter `name` training rows `indices`, starting as the base's rows (the model
        computes what it computed)."""
        if self.tied_to is not None:
            return  # the embedding holds the rows
        idx = torch.tensor(list(indices), dtype=torch.long, device=self.weight.device)
        rows = self.weight.detach()[idx].clone()  # (k, dim)
        if rows.dtype in UPCAST_DTYPES:
            rows = rows.float()
        self.trainable_tokens_delta[name] = nn.Parameter(rows)
        self._indices[name] = list(indices)

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` (unmerged) from this layer."""
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._index.pop(name, None)
        if self.tied_to is None and name in self._indices:
            del self.trainable_tokens_delta[name]
            del self._indices[name]

    def set_active(self, names: Sequence[str]) -> None:
        """Makes those of `names` this layer has the active ones (their ids must not overlap)."""
        mine = [n for n in names if n in self.adapters]
        seen: set[int] = set()
        for n in mine:
            ids = set(self.token_indices(n))
            if ids & seen:
                raise ConfigError(f"adapters {mine} train some of the same token ids; activate "
                                  "one of them at a time")
            seen |= ids
        self.active_adapters = mine

    @property
    def merged(self) -> bool:
        """Whether the rows are written into the weight (a tied head: its embedding's)."""
        return bool((self.tied_to or self).merged_adapters)

    def effective_weight(self) -> torch.Tensor:
        """The (vocab, dim) weight the forward uses: the base with the active adapters' rows."""
        w = self.weight
        source = self.tied_to or self
        if not self.enabled and self.merged:  # the base: the rows a merge replaced
            for name in source.merged_adapters:
                idx = torch.tensor(source._indices[name], dtype=torch.long, device=w.device)
                w = w.index_copy(0, idx, source._originals[name].to(w.dtype))
            return w
        if not self.enabled or self.merged:
            return w
        for name in self.active_adapters:
            w = w.index_copy(0, self.index(name, w.device), self.delta(name).to(w.dtype))
        return w

    def linear_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of the linear map a head computes (the model's chunked loss uses it,
        never materialising the logits); None for an embedding. The chunked loss then holds the
        weight's gradient, (vocab, dim) in float32, from which the rows' is taken. None in a
        mixed batch too, whose rows each take their own adapter's rows."""
        if self.is_embedding or (self.routes is not None and self.enabled and not self.merged):
            return None
        return self.effective_weight(), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routes is not None and self.enabled and not self.merged:
            return self._routed(x)
        return self._apply_weight(x, self.effective_weight())

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:
            return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        return F.linear(x, w)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed batch: each routed row with its adapter's rows, the rest with the base's.
        The input must be (batch, ...)."""
        assert self.routes is not None  # forward calls this only for a mixed batch
        n_rows = self.routes.n_rows
        if x.shape[0] != n_rows:
            raise ConfigError(f"a mixed batch of {n_rows} rows reached trainable tokens with "
                              f"input {tuple(x.shape)}; they route (batch, ...) inputs only")
        w = self.weight
        out = self._apply_weight(x, w)
        for name, rows in self.routes.groups:
            own = w.index_copy(0, self.index(name, w.device), self.delta(name).to(w.dtype))
            out = out.index_copy(0, rows, self._apply_weight(x[rows], own))
        return out

    def merge(self) -> None:
        """Writes the active adapters' rows into the weight (idempotent; a tied head's weight is
        its embedding's, merged there)."""
        if self.tied_to is not None or not self.enabled or self.merged_adapters:
            return
        with torch.no_grad():
            for name in self.active_adapters:
                idx = torch.tensor(self._indices[name], dtype=torch.long,
                                   device=self.weight.device)
                self._originals[name] = self.weight[idx].clone()
                self.weight.index_copy_(0, idx, self.delta(name).to(self.weight.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Puts the base rows back (idempotent)."""
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                idx = torch.tensor(self._indices[name], dtype=torch.long,
                                   device=self.weight.device)
                self.weight.index_copy_(0, idx, self._originals.pop(name).to(self.weight))

    def to_base(self) -> nn.Embedding | nn.Linear:
        """The plain module sharing this layer's weight (merge first to keep the rows)."""
        if self.is_embedding:
            emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                               self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.sparse, device="meta")
            emb.weight = self.weight
            return emb
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        lin.weight = self.weight
        return lin

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {len(self.token_indices(n))} tokens" for n in self.adapters) + (
            " (tied)" if self.tied_to is not None else "")


def token_layers(model: nn.Module) -> list[tuple[str, TrainableTokens]]:
    """(name, module) of every TrainableTokens of `model`, in model order."""
    return [(n, m) for n, m in modules_outside_lora(model) if isinstance(m, TrainableTokens)]


def input_embedding_name(model: nn.Module) -> str:
    """The path of the model's input embedding: transformers' get_input_embeddings(), else the
    Embedding named embed_tokens, else the only Embedding.

    Raises:
        ConfigError: when none can be told.
    """
    getter = getattr(model, "get_input_embeddings", None)
    target = None
    if callable(getter):
        try:
            target = getter()
        except (AttributeError, NotImplementedError):
            target = None
    # an embedding another adapter already trains (LoRA, rows, a whole copy) counts too: the
    # planner then says which, never "no Embedding"; an adapter's own copies do not
    embeddings = [(n, m) for n, m in model.named_modules()
                  if _is_embedding(m) and COPIES not in n]
    for n, m in embeddings:
        if m is target:
            return n
    named = [n for n, _ in embeddings if n.rsplit(".", 1)[-1] == "embed_tokens"]
    if len(named) == 1:
        return named[0]
    if len(embeddings) == 1:
        return embeddings[0][0]
    raise ConfigError("trainable tokens: cannot tell the model's input embedding among "
                      f"{[n for n, _ in embeddings] or 'no Embedding'}; name it: "
                      "{'<module>': [ids]}")


def plan_trainable_tokens(model: nn.Module, indices: list[int] | Mapping[str, list[int]]
                          ) -> list[tuple[str, list[int], str | None]]:
    """Which modules get which rows, checked against the model, changing nothing.

    A list of ids goes on the input embedding; a dict names modules (a suffix, as PEFT matches
    them) -> ids. A head whose weight is the embedding's (tied) reads the embedding's rows.

    Returns:
        (module path, ids, path of the embedding it is tied to or None), in model order.

    Raises:
        ConfigError: a name that matches no Embedding / bias-free Linear, an id outside the
            vocabulary, or a tied head given other ids than its embedding.
    """
    by_name = dict(indices) if isinstance(indices, Mapping) else {
        input_embedding_name(model): list(indices)}
    modules = {n: m for n, m in model.named_modules() if COPIES not in n}
    chosen: dict[str, list[int]] = {}
    problems = []
    for key, ids in by_name.items():
        # PEFT's rule: a module whose full name ends with the key
        hits = [n for n, m in modules.items() if n.endswith(key) and _wrappable(m)]
        if not hits:
            near = [n for n, m in modules.items() if _wrappable(m)]
            more = f" and {len(near) - 5} more" if len(near) > 5 else ""
            problems.append(f"{key!r} matches no Embedding or bias-free Linear (the model has "
                            f"{', '.join(near[:5]) or 'none'}{more})")
        for n in hits:
            rows = modules[n].weight.shape[0]
            bad = [i for i in ids if not 0 <= i < rows]
            if bad:
                problems.append(f"token ids {bad[:5]} are outside the vocabulary of {n} "
                                f"(ids 0 to {rows - 1})")
            chosen[n] = list(ids)
    problems += _trained_otherwise(modules, chosen)
    if problems:
        raise ConfigError("trainable tokens: " + "; ".join(problems))
    embeddings = [n for n in chosen
                  if getattr(modules[n], "is_embedding", isinstance(modules[n], nn.Embedding))]
    emb = input_embedding_name(model) if embeddings else None
    plan: list[tuple[str, list[int], str | None]] = []
    if emb is not None and emb in chosen:
        weight = modules[emb].weight
        for n, m in modules.items():
            head = type(m) is nn.Linear or isinstance(m, TrainableTokens) and not m.is_embedding
            if head and m.weight is weight:
                if n in chosen and chosen[n] != chosen[emb]:
                    raise ConfigError(
                        f"trainable tokens: {n} shares its weight with {emb} (tied embeddings) "
                        f"and must train the same ids; leave {n} out or give it {chosen[emb]}")
                chosen.pop(n, None)
                plan.append((n, chosen[emb], emb))
    shared = _shared_weights(model, chosen, {p[0] for p in plan})
    if shared:
        raise ConfigError(f"trainable tokens: {shared} share one weight (tied embeddings); "
                          "give the input embedding the ids, its head follows it")
    plan = [(n, ids, None) for n, ids in chosen.items()] + plan
    order = list(modules)
    return sorted(plan, key=lambda p: order.index(p[0]))


def _wrappable(m: nn.Module) -> bool:
    """A module rows can train on: a plain Embedding, a bias-free Linear, or one that has rows
    of another adapter already; also one that another adapter trains by LoRA or as a whole
    copy, so that the planner refuses it by name (`_trained_otherwise`)."""
    if isinstance(m, SavedModule):
        m = m.original
    return (type(m) is nn.Embedding or (type(m) is nn.Linear and m.bias is None)
            or isinstance(m, (TrainableTokens, LoRAEmbedding)))


def _is_embedding(m: nn.Module) -> bool:
    if isinstance(m, SavedModule):
        m = m.original
    return (isinstance(m, (nn.Embedding, LoRAEmbedding))
            or isinstance(m, TrainableTokens) and m.is_embedding)


def _trained_otherwise(modules: Mapping[str, nn.Module], chosen: Mapping[str, list[int]]
                       ) -> list[str]:
    """One line per chosen module that another adapter already trains another way: LoRA on
    the embedding, or a whole copy of it (or of a module holding it, or inside it)."""
    problems = []
    saved = {n: m for n, m in modules.items() if isinstance(m, SavedModule)}
    for n in chosen:
        m = modules[n]
        if isinstance(m, LoRAEmbedding):
            owners = ", ".join(repr(a) for a in m.adapter_names)
            problems.append(f"{n} has LoRA of adapter {owners}; an embedding trains one way: "
                            "LoRA on it, or its token rows, not both")
        for s, copy in saved.items():
            if s == n or n.startswith(s + ".") or s.startswith(n + "."):
                owners = ", ".join(repr(a) for a in copy.adapters)
                problems.append(f"{n} is, holds or sits in {s}, which adapter {owners} saves "
                                "whole (modules to save); train it one way: its token rows, or "
                                "a whole copy, not both")
    return problems


def _shared_weights(model: nn.Module, chosen: Mapping[str, list[int]], tied: set[str]
                    ) -> list[str]:
    """Paths among `chosen` and the other modules holding their weights (a tied head with LoRA
    on it, say), the planned `tied` heads left out."""
    holders: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and n not in tied:
            holders.setdefault(id(w), []).append(n)
    return sorted({n for names in holders.values() if len(names) > 1 for n in names
                   if any(x in chosen for x in names)})


def add_trainable_tokens(model: nn.Module, plan: list[tuple[str, list[int], str | None]],
                         name: str) -> None:
    """Puts adapter `name`'s rows on the planned modules (see `plan_trainable_tokens`), wrapping
    each plain module in a TrainableTokens once; the embeddings first, so a tied head finds its
    embedding's wrapper."""
    wrappers: dict[str, TrainableTokens] = {}
    for path, ids, tied in sorted(plan, key=lambda p: p[2] is not None):
        module = model.get_submodule(path)
        if not isinstance(module, TrainableTokens):
            assert isinstance(module, (nn.Embedding, nn.Linear))  # as plan_trainable_tokens chose
            module = TrainableTokens(module, tied_to=wrappers.get(tied) if tied else None)
            _replace(model, path, module)
        module.add_adapter(name, ids)
        wrappers[path] = module


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

