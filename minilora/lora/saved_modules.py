"""Modules to save: a full trainable copy of chosen modules (PEFT's ``modules_to_save``).

`SavedModule` wraps any module by composition. It takes over the original's Parameters,
buffers and children under their own names (a model's base state_dict keys do not change) and
keeps, per adapter name, a deep copy in ``modules_to_save[name]``, which trains and is saved
whole. A forward runs the active adapter's copy (one at a time, as PEFT), or the original when
none is active or adapters are disabled.

A copy of a module whose weight was tied (an lm_head sharing the embedding's) is a copy: it
trains apart from the embedding, as PEFT's default (``ensure_weight_tying`` off) does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from minilora.core.errors import ConfigError
from minilora.lora.adapter_set import AdapterSet
from minilora.lora.routes import Routes

# The original's plain attributes worth reading through the wrapper (in_features, eps, ...).
_PLAIN = (int, float, str, bool, type(None))


class SavedModule(nn.Module):
    """A module plus a trainable copy of it per named adapter.

    Args:
        original: the module to copy; its Parameters, buffers and children become this
            wrapper's under the same names (same objects), and it stays frozen.

    `active_adapters` holds at most one name; `enabled` False runs the original.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for n, p in original._parameters.items():
            self._parameters[n] = p
        for n, b in original._buffers.items():
            self.register_buffer(n, b, persistent=n not in original._non_persistent_buffers_set)
        for n, child in original._modules.items():
            self._modules[n] = child
        for k, v in vars(original).items():
            if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN):
                self.__dict__.setdefault(k, v)
        # The original runs the base forward; a tuple keeps it from being a second submodule.
        self._original: tuple[nn.Module, ...] = (original,)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.enabled = True
        # a mixed batch's rows per adapter for the current call (minilora.lora.named), else None
        self.routes: Routes | None = None

    @property
    def original(self) -> nn.Module:
        """The wrapped module (frozen; the base)."""
        return self._original[0]

    @property
    def adapters(self) -> list[str]:
        """The adapter names this module has a copy for."""
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        """Adds adapter `name`: a copy of the original, which computes what it computes."""
        self.modules_to_save[name] = copy.deepcopy(self.original)

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name`'s copy."""
        self.active_adapters = [n for n in self.active_adapters if n != name]
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def set_active(self, names: Sequence[str]) -> None:
        """Makes the one of `names` this module has a copy for the active one.

        Raises:
            ConfigError: when several of `names` have a copy here (their copies cannot add up).
        """
        mine = [n for n in names if n in self.modules_to_save]
        if len(mine) > 1:
            raise ConfigError(f"adapters {mine} each hold a trained copy of the same module; "
                              "activate one of them at a time")
        self.active_adapters = mine

    def current(self) -> nn.Module:
        """The module a forward runs: the active copy, or the original."""
        if self.enabled and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.original

    def linear_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when the module run is a plain Linear (the model's chunked loss uses
        them, never materialising the logits), else None; None in a mixed batch too, whose rows
        each take their own copy (the head then runs itself, per row)."""
        if self.routes is not None and self.enabled:
            return None
        m = self.current()
        return (m.weight, m.bias) if type(m) is nn.Linear else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routes is not None and self.enabled:
            return self._routed(*args, **kwargs)
        return self.current()(*args, **kwargs)

    def _routed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed batch: each routed row through its adapter's copy, the rest through the
        original. The input must be (batch, ...)."""
        assert self.routes is not None  # forward calls this only for a mixed batch
        n_rows = self.routes.n_rows
        if x.shape[0] != n_rows:
            raise ConfigError(f"a mixed batch of {n_rows} rows reached a module to save with "
                              f"input {tuple(x.shape)}; it routes (batch, ...) inputs only")
        out = self.original(x, *args, **kwargs)
        for name, rows in self.routes.groups:
            out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return out

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> SavedModule:
        # .to() / .half() may give the wrapper new tensors: the original must hold the same
        super()._apply(fn, recurse)
        original = self.original
        for n in original._parameters:
            original._parameters[n] = self._parameters[n]
        for n in original._buffers:
            original._buffers[n] = self._buffers[n]
        return self


def saved_layers(model: nn.Module) -> list[tuple[str, SavedModule]]:
    """(name, module) of every SavedModule of `model`, in model order."""
    return [(n, m) for n, m in modules_outside_lora(model) if isinstance(m, SavedModule)]


def modules_outside_lora(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()`, less the insides of LoRA layers: a LoRA layer's children are
    its adapters' own Linears (two per adapter), none of them anything else the library looks
    for, and with many adapters resident they are most of the model's modules (loading one
    adapter into a server holding 32 walked them a dozen times)."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[nn.Module] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if module in seen:
            return
        seen.add(module)
        found.append((prefix, module))
        if isinstance(module, AdapterSet):  # a LoRA layer (Linear or embedding)
            return
        for name, child in module._modules.items():
            if child is not None:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def plan_saved_modules(model: nn.Module, names: Sequence[str], lora_paths: Sequence[str]
                       ) -> list[str]:
    """The paths of the modules `names` selects, checked, changing nothing.

    PEFT's rule: a module is selected when its full name ends with one of `names`.

    Args:
        model: the model (LoRA layers, if any, are never selected nor entered).
        names: the modules_to_save names.
        lora_paths: the layers LoRA goes on (or is on), of this adapter and every other, and
            the layers trainable tokens are on: none may be, hold or sit in a module to save.

    Raises:
        ConfigError: a name that selects nothing (the message lists the model's module names
            ending alike), a selected module that is, holds or sits in one of `lora_paths` or
            another selected module, or the root.
    """
    copies = tuple(f"{n}.modules_to_save." for n, _ in saved_layers(model))
    modules = [(n, m) for n, m in model.named_modules() if n and not n.startswith(copies)]
    problems = []
    chosen: list[str] = []
    for key in names:
        hits = [n for n, _ in modules if n.endswith(key)]
        if not hits:
            last = sorted({n.rsplit(".", 1)[-1] for n, _ in modules})
            last = [x for x in last if not x.isdigit()]
            problems.append(f"{key!r} matches no module (the model's module names end in: "
                            f"{', '.join(last)})")
        chosen += [n for n in hits if n not in chosen]
    clash = [n for n in chosen if any(_overlap(n, p) for p in lora_paths)]
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        problems.append(f"{clash[0]}{more} is, holds or sits in a LoRA layer or trainable "
                        "tokens; a module trains one way, by LoRA, its token rows or as a whole "
                        "copy: drop it from one list")
    for n in chosen:
        inner = [o for o in chosen if o != n and o.startswith(n + ".")]
        if inner:
            problems.append(f"{n} holds {inner[0]}, also selected; name one of them")
    if problems:
        raise ConfigError("modules to save: " + "; ".join(problems))
    return chosen


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def add_saved_modules(model: nn.Module, paths: Sequence[str], name: str) -> None:
    """Gives each module at `paths` a trainable copy for adapter `name` (wrapping it once)."""
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        module.add_adapter(name)
