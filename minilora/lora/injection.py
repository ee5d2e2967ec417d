"""Putting LoRA into a model and taking it out: injection by target, the parameters to
train, merging, unloading, and running the base alone.

Finds LoRALinear layers by type (never by a parameter's name) and leaves each adapter's math
to minilora.lora.layer; which adapters are active, and mixed batches, to minilora.lora.named.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from minilora.core.errors import ConfigError
from minilora.lora.embedding import LoRAEmbedding, refuse_embedding_config
from minilora.lora.layer import (
    DEFAULT_ADAPTER,
    LoraConfig,
    LoRALayer,
    LoRALinear,
    check_adapter_name,
    lora_modules,
    matches,
)
from minilora.lora.named import (
    install_row_hooks,
    plain_module,
    refuse_merged,
    remove_row_hooks,
    replace_submodule,
    set_active,
)
from minilora.lora.saved_modules import (
    SavedModule,
    add_saved_modules,
    plan_saved_modules,
    saved_layers,
)
from minilora.lora.trainable_tokens import (
    COPIES,
    TrainableTokens,
    add_trainable_tokens,
    plan_trainable_tokens,
    token_layers,
)
from minilora.lora.weight_hash import hash_weights

# What LoRA can go on: a plain Linear, or one that has adapters already.
AnyLinear = nn.Linear | LoRALinear
# ... or an embedding table, when a target names it (never "all-linear" or "square").
AnyEmbedding = nn.Embedding | LoRAEmbedding
AnyTarget = AnyLinear | AnyEmbedding


@dataclass
class InjectionReport:
    """What `inject_lora` did.

    Attributes:
        modules: (name, in_features, out_features) of every adapted Linear (an embedding's
            num_embeddings, embedding_dim), in model order.
        lora_parameters: number of LoRA parameters added, sum of r * (in + out) (+ out
            with DoRA).
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
    """Parameter counts as MiniMind prints them (shared Parameters counted once).

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


def linear_modules(model: nn.Module) -> Iterator[tuple[str, AnyLinear]]:
    """Yields Linear and LoRALinear modules by name, never descending into a LoRALinear
    (its lora_A/lora_B are Linears too, and must not be adapted themselves) nor into a module
    to save's copies."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, AnyLinear]]:
        for child_name, child in module.named_children():
            if isinstance(module, SavedModule) and child is module.modules_to_save:
                continue  # an adapter's own trained copies, not the base's layers
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, (nn.Linear, LoRALinear)):
                yield name, child
            if not isinstance(child, LoRALinear):
                yield from walk(child, name)

    yield from walk(model, "")


def embedding_modules(model: nn.Module) -> list[tuple[str, AnyEmbedding | TrainableTokens]]:
    """(name, module) of every nn.Embedding and LoRAEmbedding of `model`, and every embedding
    with trainable tokens (`_select` refuses LoRA on it by name), in model order (none inside
    a LoRA layer nor a module to save's copies)."""
    inside = tuple(n + "." for n, m in model.named_modules()
                   if isinstance(m, (LoRALinear, LoRAEmbedding)))
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, (nn.Embedding, LoRAEmbedding))
                or isinstance(m, TrainableTokens) and m.is_embedding)
            and not n.startswith(inside) and COPIES not in n]


def _dims(m: AnyTarget) -> tuple[int, int]:
    """(in, out) of a layer LoRA goes on: an embedding's (num_embeddings, embedding_dim)."""
    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    return m.in_features, m.out_features


def output_head_names(model: nn.Module, linears: list[tuple[str, AnyLinear]]) -> set[str]:
    """Returns the names of Linears that produce the output logits: named lm_head, the model's own
    get_output_embeddings() (transformers), or a Linear whose weight is an Embedding's."""
    embedding_weights = {id(m.weight) for m in model.modules()
                         if isinstance(m, (nn.Embedding, LoRAEmbedding))}
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


def _select(model: nn.Module, config: LoraConfig) -> list[tuple[str, AnyTarget]]:
    linears = list(linear_modules(model))
    targets = config.targets
    chosen: list[tuple[str, AnyTarget]]
    if targets == "all-linear":
        heads = output_head_names(model, linears)
        chosen = [(n, m) for n, m in linears if n not in heads]
    elif targets == "square":
        chosen = [(n, m) for n, m in linears if m.in_features == m.out_features]
    else:  # names may also pick an embedding table (PEFT's LoRA on nn.Embedding)
        tables = embedding_modules(model)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        either = sorted([*linears, *tables], key=lambda item: order[item[0]])
        whole = [n for n, _ in saved_layers(model) if matches(n, targets)
                 and not (config.exclude and matches(n, config.exclude))]
        if whole:  # its wrapper is no Linear: say why, not "matches no Linear"
            raise ConfigError(f"LoRA targets {whole[0]}, a module another adapter saves whole "
                              "(modules to save); exclude it, or pick other targets")
        _check_every_suffixmatches(targets, [n for n, _ in linears],
                                   also=[n for n, _ in tables])
        picked = [(n, m) for n, m in either if matches(n, targets)]
        for n, m in picked:
            if isinstance(m, TrainableTokens):
                owners = ", ".join(repr(a) for a in m.adapters)
                raise ConfigError(f"{n} has trainable tokens of adapter {owners}; an embedding "
                                  "trains one way: LoRA on it, or its token rows, not both")
        chosen = [(n, m) for n, m in picked if not isinstance(m, TrainableTokens)]
    if config.exclude:
        chosen = [(n, m) for n, m in chosen if not matches(n, config.exclude)]
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "(none)"
        raise ConfigError(
            f"LoRA targets {config.targets!r} (exclude {config.exclude!r}) match no Linear "
            f"module; the model's Linear modules are: {names}"
        )
    return chosen


def check_excludes_match(model: nn.Module, exclude: list[str] | str) -> None:
    """Each exclude suffix (or the exclude regex) must name a Linear of ``model``: one that names
    none is a typo that would adapt the layer the user meant to keep. (A loaded adapter's
    exclude is not checked: PEFT refuses only an exclude that leaves nothing adapted.)

    Raises:
        ConfigError: naming each exclude that matches nothing, with the nearest real names.
    """
    if not exclude:
        return
    names = [n for n, _ in linear_modules(model)]
    if isinstance(exclude, str):
        if not any(matches(n, exclude) for n in names):
            suffixes = ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
            raise ConfigError(f"LoRA exclude '{exclude}' matches no Linear module, so it "
                              f"excludes nothing; the model's Linear names end in: {suffixes}")
        return
    _check_every_suffixmatches(exclude, names, "exclude")


def _check_every_suffixmatches(targets: list[str] | str, names: list[str],
                               what: str = "targets", also: list[str] | None = None) -> None:
    """A listed suffix that matches no Linear is a typo (``v_prj``): an error naming each, with
    the nearest real names, rather than a run that silently adapts the others only. A suffix
    that matches one of `also` (embedding tables) is no typo either."""
    if isinstance(targets, str):
        return  # a regex
    missing = [t for t in targets if not any(matches(n, [t]) for n in [*names, *(also or [])])]
    if not missing:
        return
    # The distinct last parts (q_proj, lm_head, ...): a short list, not every layer's path.
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    hints = []
    for t in missing:
        near = difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.5)
        hints.append(f"{t!r} (nearest: {', '.join(near) or 'none'})")
    raise ConfigError(
        f"LoRA {what} {hints[0] if len(hints) == 1 else ', '.join(hints)} match no Linear "
        f"module; the model's Linear names end in: {', '.join(suffixes) or '(none)'}"
    )


def inject_lora(
    model: nn.Module, config: LoraConfig, name: str = DEFAULT_ADAPTER
) -> InjectionReport:
    """Adds adapter `name` to the targeted Linear modules of `model`, in place.

    A Linear becomes a LoRALinear (an nn.Embedding a target names, a LoRAEmbedding); a layer
    that already has LoRA gets the adapter beside its others. The new adapter becomes the only
    active one (it starts as a no-op: B = 0, an embedding's A = 0, so the model then computes
    the base); `set_active` changes that.

    Args:
        model: any nn.Module (a transformers model included).
        config: rank, scaling, targets and init.
        name: the adapter's name ("default": the keys stay `<path>.lora_A.weight`).

    Returns:
        An InjectionReport naming the adapted modules and the number of LoRA parameters.

    Raises:
        ConfigError: when the targets match no Linear (the message lists those the model has),
            match a layer that already has an adapter of this name, r exceeds min(in, out) of a
            target, the name is not valid, or the model's LoRA is merged. Nothing is changed
            when it raises.
    """
    check_adapter_name(name)
    chosen = _select(model, config)
    _check_injectable(model, chosen, config, name)
    saved, tokens = _plan_extras(model, chosen, config)
    # PiSSA: the fingerprint of the weights it replaces with their residual, kept by each layer
    # for the adapter (see LoRALinear.pissa_from)
    pissa_from = (hash_weights({path: linear.weight for path, linear in chosen})
                  if config.init == "pissa" else None)
    modules = []
    added = 0
    for path, linear in chosen:
        lora: LoRALinear | LoRAEmbedding
        if isinstance(linear, (LoRALinear, LoRAEmbedding)):
            linear.add_adapter(name, config.r, config.alpha, config.dropout, config.init,
                               config.use_rslora, config=config, use_dora=config.use_dora)
            lora = linear
        elif isinstance(linear, nn.Embedding):
            lora = LoRAEmbedding(linear, config.r, config.alpha, config.dropout, config.init,
                                 config.use_rslora, name=name)
            lora.train(linear.training)
            replace_submodule(model, path, lora)
        else:
            lora = LoRALinear(
                linear, config.r, config.alpha, config.dropout, config.init, config.use_rslora,
                name=name, use_dora=config.use_dora,
            )
            lora.train(linear.training)
            replace_submodule(model, path, lora)
        lora.lora_config[name] = config
        if pissa_from is not None:
            lora.pissa_from[name] = pissa_from
        n_in, n_out = _dims(linear)
        modules.append((path, n_in, n_out))
        added += config.r * (n_in + n_out)
        added += n_out if config.use_dora else 0  # DoRA's magnitude
    add_saved_modules(model, saved, name)
    add_trainable_tokens(model, tokens, name)
    set_active(model, [name])
    install_row_hooks(model)
    return InjectionReport(modules=modules, lora_parameters=added, adapter=name)


def _check_injectable(
    model: nn.Module, chosen: list[tuple[str, AnyTarget]], config: LoraConfig, name: str
) -> None:
    """Raises ConfigError when adapter `name` cannot go on every chosen layer."""
    for path, m in chosen:
        if isinstance(m, (nn.Embedding, LoRAEmbedding)):
            refuse_embedding_config(config.init, config.use_dora, path)
            if not m.weight.dtype.is_floating_point:
                raise ConfigError(f"LoRA on the embedding {path}: its table is quantized "
                                  f"({m.weight.dtype}); load the base unquantized or leave the "
                                  "embedding out of the targets")
    twice = [n for n, m in chosen
             if isinstance(m, (LoRALinear, LoRAEmbedding)) and name in m.lora_A]
    if twice:
        raise ConfigError(
            f"these layers already have LoRA adapter {name!r} (inject once per layer and name; "
            f"another name adds a second adapter): {twice}"
        )
    refuse_merged(model, "adding an adapter")
    too_small = [f"{n} ({_dims(m)[0]} -> {_dims(m)[1]})" for n, m in chosen
                 if config.r > min(_dims(m))]
    if too_small:
        raise ConfigError(
            f"r={config.r} is larger than min(in_features, out_features) of: {too_small}"
        )


def _plan_extras(model: nn.Module, chosen: list[tuple[str, AnyTarget]], config: LoraConfig
                 ) -> tuple[list[str], list[tuple[str, list[int], str | None]]]:
    """The modules to save and the trainable tokens' modules of `config`, checked against the
    model and the LoRA layers `chosen`, before anything changes."""
    lora_paths = [p for p, _ in chosen]
    # what a new module to save may not be, hold or sit in: any adapter's LoRA layer or
    # trainable tokens (its copy would swallow them, and their keys would move into it)
    trained = sorted({*lora_paths, *(n for n, _ in lora_modules(model)),
                      *(n for n, _ in token_layers(model))})
    saved_paths = [s for s, _ in saved_layers(model)]  # walked once, not once per target
    inside = [p for p in lora_paths for s in saved_paths if p == s or p.startswith(s + ".")]
    if inside:  # the copy another adapter runs there would skip this LoRA
        raise ConfigError(f"LoRA targets {inside[0]}, inside a module another adapter saves "
                          "whole (modules to save); exclude it, or pick other targets")
    saved = (plan_saved_modules(model, config.modules_to_save, trained)
             if config.modules_to_save else [])
    tokens = (plan_trainable_tokens(model, config.trainable_token_indices)
              if config.trainable_token_indices else [])
    clash = sorted({p for p, _, _ in tokens} & (set(saved) | set(lora_paths)))
    tied = [f"{p} (tied to {t}: it reads the embedding's rows)" for p, _, t in tokens
            if t is not None and p in clash]
    if clash:
        raise ConfigError(f"trainable tokens go on {', '.join(tied) or clash}, which LoRA or "
                          "modules to save already train; train each module one way")
    return saved, tokens


def extra_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The modules-to-save copies' and trainable tokens' Parameters of adapter `name` (default:
    the active adapters), each once (a tied head shares its embedding's rows)."""
    params: dict[int, nn.Parameter] = {}
    for _, saved in saved_layers(model):
        for n in saved.active_adapters if name is None else [name]:
            if n in saved.modules_to_save:
                params.update({id(p): p for p in saved.modules_to_save[n].parameters()})
    for _, tokens in token_layers(model):
        for n in tokens.active_adapters if name is None else [name]:
            if n in tokens.adapters:
                params[id(tokens.delta(n))] = tokens.delta(n)
    return list(params.values())


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Returns LoRA A and B Parameters (and the modules-to-save copies' and trainable tokens'
    rows): the list to give the optimizer.

    Args:
        model: a model with LoRA.
        name: that adapter's Parameters; None: the active adapters' (a single adapter's by
            default).
    """
    params = []
    for _, m in lora_modules(model):
        names = m.active_adapters if name is None else [name] if name in m.lora_A else []
        for n in names:
            params += m.adapter_parameters(n)
    return params + extra_parameters(model, name)


def mark_trainable(model: nn.Module) -> None:
    """Freezes every Parameter of `model` except those of the active adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Returns total, trainable and LoRA parameter counts (works on meta tensors too)."""
    params = list(model.parameters())  # deduplicated: tied weights count once
    lora = [p for _, m in lora_modules(model) for n in m.lora_A for p in m.adapter_parameters(n)]
    lora += [p for n in _extra_adapters(model) for p in extra_parameters(model, n)]
    return ParameterCounts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        lora=sum(p.numel() for p in lora),
    )


def merge_lora(model: nn.Module) -> None:
    """Merges the active adapters of every LoRALinear of `model` (idempotent).

    Raises:
        ConfigError: when a layer to merge into shares its weight with another module (a tied
            lm_head / embed_tokens): the merge would change that module too. Nothing is merged.
    """
    _refuse_shared_weights(model)
    for _, m in lora_modules(model):
        m.merge()
    for _, tokens in token_layers(model):  # a copy to save needs no merging: it runs as is
        tokens.merge()


def _untie_lm_head(model: nn.Module) -> None:
    """Gives an adapted lm_head that shares its weight with the input embedding only (a tied
    model) a copy of its own, and sets ``config.tie_word_embeddings`` False, so that merging
    changes the head and not the embedding."""
    config: Any = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    for path, m in lora_modules(model):
        if path.rpartition(".")[2] != "lm_head" or m.merged or not m.active_adapters:
            continue
        others = [n for n in holders.get(id(m.weight), []) if n != f"{path}.weight"]
        if others and all(n.endswith("embed_tokens.weight") for n in others):
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            config.tie_word_embeddings = False


def _untie_embedding(model: nn.Module) -> None:
    """Gives an adapted embedding that shares its table with the output head only (a tied
    model) a copy of its own, and sets ``config.tie_word_embeddings`` False: the update changes
    the lookup alone (the head reads the base table, as unmerged), so merging must too."""
    config: Any = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    # a head saved whole (modules to save) holds the tied table too, in its wrapper
    candidates: list[tuple[str, AnyLinear]] = list(linear_modules(model))
    candidates += [(n, s.original) for n, s in saved_layers(model)
                   if isinstance(s.original, nn.Linear)]
    heads = output_head_names(model, candidates)
    for path, m in lora_modules(model):
        if not isinstance(m, LoRAEmbedding) or m.merged or not m.active_adapters:
            continue
        others = [n for n in holders.get(id(m.weight), []) if n != f"{path}.weight"]
        if others and all(n.rpartition(".")[0] in heads for n in others):
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            config.tie_word_embeddings = False


def _refuse_shared_weights(model: nn.Module) -> None:
    """Raises when a layer with something to merge holds a weight that other names share.

    LoRALinear.merge cannot check this itself: only the model sees who else holds the weight.
    """
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    shared = []
    for path, m in lora_modules(model):
        if m.merged or not m.active_adapters:
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
    for _, tokens in token_layers(model):
        tokens.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds the active adapters into the base weights and puts plain nn.Linear modules back
    (inactive adapters are dropped).

    Returns:
        `model` itself (changed in place), or a new nn.Linear when `model` is a LoRALinear.

    Raises:
        ConfigError: when a layer to merge into shares its weight with another module (other
            than a tied lm_head, which is untied: see below). Nothing is changed.

    A LoRA on an lm_head tied to the input embedding (``config.tie_word_embeddings``) is merged
    into a copy of the weight: the lm_head is untied (the config says so), the embedding keeps
    the base weight, and the model computes what the adapted one did. A LoRA on the embedding
    of a tied model likewise goes into a copy of the table; the head keeps the base.
    """
    if isinstance(model, LoRALinear):
        return model.to_linear()
    _untie_lm_head(model)
    _untie_embedding(model)
    _refuse_shared_weights(model)
    for name, m in lora_modules(model):
        replace_submodule(model, name, plain_module(m))
    _unload_extras(model)
    remove_row_hooks(model)
    return model


def _extra_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, saved in saved_layers(model):
        names.update(dict.fromkeys(saved.adapters))
    for _, tokens in token_layers(model):
        names.update(dict.fromkeys(tokens.adapters))
    return list(names)


def _unload_extras(model: nn.Module) -> None:
    """Trainable tokens merged into their weight, and each module to save replaced by its
    active copy (the original when none is active), as PEFT unloads them. A copy of a module
    whose weight was tied to another takes its own weight: the config says untied."""
    for _, tokens in token_layers(model):
        tokens.merge()
    for path, tokens in reversed(token_layers(model)):
        replace_submodule(model, path, tokens.to_base())
    holders: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    config: Any = getattr(model, "config", None)
    for path, saved in saved_layers(model):
        chosen = saved.current()
        if chosen is not saved.original and any(
                holders.get(id(p), 0) > 1 for p in saved.original.parameters(recurse=False)):
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        replace_submodule(model, path, chosen)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the base model alone inside the block (merged adapters too), then restores.

    Example:
        with disabled(model):
            base_logits = model(x)
    """
    modules: list[LoRALayer | SavedModule | TrainableTokens] = [m for _, m in lora_modules(model)]
    modules += [m for _, m in saved_layers(model)] + [m for _, m in token_layers(model)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before, strict=True):
            m.enabled = was



