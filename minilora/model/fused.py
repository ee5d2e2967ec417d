"""Fused projections: sibling Linears that read the same input run as one matrix product.

The attention's q/k/v and the MLP's gate/up read one input each. `project(modules, x)` returns
what each module returns for x, computed as one product with the weights concatenated for the
call (`[W_q; W_k; W_v]`), and, where the modules carry LoRA adapters, the adapters' down
projections stacked into one product too (`x [A_q; A_v]^T`), each B applied to its slice. The
modules stay as they are (same names, same Parameters, same state_dict): nothing is stored
fused, so loading, saving, merging and tying see the per-module weights only.

Memory: the concatenated weight exists for the call only. In float32 it is one layer's q/k/v (or
gate/up) weights, freed when the product is done; backward reads the per-module weights, so no
concatenated copy is held through the step. Under autocast the weights are cast into one
low-precision buffer, which is the copy autocast makes of each weight anyway.

This module knows nothing of LoRA. A module fuses when it is a plain `nn.Linear` or implements
`fused_parts(x)`, returning `(weight, bias, adapter)` with adapter `(A, B, scale)` or None (the
base alone), or None when it must run its own forward (see minilora.lora.layer.LoRALinear). Anything
else makes the whole group run module by module, exactly as without fusion: a module with
hooks (except a forward hook whose `fusion_idle(module)` says it has nothing to do this call),
a trainable base weight, mixed dtypes or devices. `fusion(False)` turns fusion off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

# One module of a group: (weight, bias, (A, B, scaling) of its one adapter or None), as
# minilora.lora.layer.LoRALinear.fused_parts returns it; and per module (out, rank, scaling).
Part = tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, float] | None]
Spec = tuple[int, int, float]

_ENABLED = [True]
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, nn.Parameter)


@contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """Turns fused projections on or off inside the block (process-wide), then restores.

    Args:
        enabled: False runs every projection as its own module call.
    """
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


def fusion_enabled() -> bool:
    """Whether `project` fuses (see `fusion`)."""
    return _ENABLED[0]


def project(modules: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """Each module applied to x: `[m(x) for m in modules]`, computed as one product when the
    modules can fuse (see the module docstring), else by calling each.

    Args:
        modules: sibling projections reading x, e.g. (q_proj, k_proj, v_proj).
        x: (..., in) their input.

    Returns:
        One (..., out_i) tensor per module, views into one output when fused.
    """
    parts = _fusable_parts(modules, x) if _ENABLED[0] and len(modules) > 1 else None
    dt = _compute_dtype(parts, x) if parts is not None else None
    if parts is None or dt is None:
        return [m(x) for m in modules]
    a_cat, b_flat = _stacked_adapters(parts)
    spec = tuple((w.shape[0], ad[0].shape[0] if ad else 0, ad[2] if ad else 0.0)
                 for w, _, ad in parts)  # per module: out, rank (0: no adapter), scale
    weights, biases = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
    # one (..., out_i) view per module into one (..., sum of out_i) output
    return list(_GroupLinear.apply(x, a_cat, b_flat, dt, spec, weights, biases))


# ------------------------------------------------------------------------------------------------
# Which groups fuse
# ------------------------------------------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    """Whether a hook would see or change this module's call (a forward hook whose
    `fusion_idle(module)` says it has nothing to do this call does not count)."""
    busy = [h for h in m._forward_hooks.values()
            if not (hasattr(h, "fusion_idle") and h.fusion_idle(m))]
    return bool(busy or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks)


def _fusable_parts(modules: Sequence[nn.Module], x: Tensor) -> list[Part] | None:
    """(weight, bias, adapter) of each module, or None when one of them cannot fuse."""
    parts: list[Part] = []
    for m in modules:
        if _has_hooks(m):
            return None
        if type(m) is nn.Linear:
            part = (m.weight, m.bias, None)
        elif (fused_parts := getattr(m, "fused_parts", None)) is not None:  # a LoRALinear's
            part = fused_parts(x)
            if part is None:
                return None
        else:
            return None
        weight, bias, _ = part
        if type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
            return None  # a tensor subclass (a quantized weight) computes its own product
        grad = torch.is_grad_enabled()
        if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return None  # full fine-tuning: each module's own autograd computes its gradient
        parts.append(part)
    return parts


def _compute_dtype(parts: list[Part], x: Tensor) -> torch.dtype | None:
    """The dtype the group computes in (what each module would), or None: unfused."""
    tensors = [t for w, b, ad in parts for t in (w, b, *(ad[:2] if ad else ())) if t is not None]
    if any(t.device != x.device for t in tensors):
        return None
    dtypes = {p[0].dtype for p in parts} | {p[1].dtype for p in parts if p[1] is not None}
    if len(dtypes) != 1:
        return None
    (w_dtype,) = dtypes
    if len({t.dtype for _, _, ad in parts if ad for t in ad[:2]}) > 1:
        return None
    if torch.is_autocast_enabled(x.device.type):
        # autocast casts float32/16 products to its dtype and leaves float64 alone
        return torch.get_autocast_dtype(x.device.type) if w_dtype in _COMPUTE_DTYPES else None
    return w_dtype if x.dtype == w_dtype and w_dtype in _COMPUTE_DTYPES else None


def _stacked_adapters(parts: list[Part]) -> tuple[Tensor | None, Tensor | None]:
    """The A's stacked (R, in) and the B's flattened into one vector: two tensors autograd
    tracks (their gradients split back to each A and B), whatever the count and the ranks."""
    adapters = [ad for _, _, ad in parts if ad is not None]
    if not adapters:
        return None, None
    a_cat = torch.cat([a for a, _, _ in adapters])  # (R, in)
    return a_cat, torch.cat([b.reshape(-1) for _, b, _ in adapters])  # (sum out_i r_i,)


# ------------------------------------------------------------------------------------------------
# The group's product: one autograd node
# ------------------------------------------------------------------------------------------------


def _slices(spec: tuple[Spec, ...]
            ) -> tuple[list[tuple[int, int]], list[tuple[int, int] | None]]:
    """Each module's columns of the output and of the stacked rank-r product."""
    outs, ranks, o, r = [], [], 0, 0
    for out, rank, _ in spec:
        outs.append((o, o + out))
        ranks.append((r, r + rank) if rank else None)
        o, r = o + out, r + rank
    return outs, ranks


def _cat(tensors: list[Tensor], dt: torch.dtype) -> Tensor:
    """torch.cat along dim 0, cast to dt in the same pass (one write, no per-tensor copies)."""
    out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=dt,
                      device=tensors[0].device)
    row = 0
    for t in tensors:
        out[row:row + t.shape[0]].copy_(t)
        row += t.shape[0]
    return out


class _GroupLinear(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T for every module i, as one (N, sum out_i)
    output: one product with the concatenated weights, one with the stacked A's.

    The same choices as minilora.lora.layer's single-layer node: each B adds into its slice of the
    output in place (`addmm_`), the scale goes on the rank-r intermediate, the skinny gradient
    products run in their fast orientation, and grad_x accumulates into one buffer
    (g W_i summed, plus g_h A) instead of autograd adding one (N, in) tensor per module.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, a_cat: Tensor | None, b_flat: Tensor | None,
                dt: torch.dtype, spec: tuple[Spec, ...], weights: tuple[Tensor, ...],
                biases: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        outs, ranks = _slices(spec)
        lora = [i for i, rk in enumerate(ranks) if rk is not None]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
            w = _cat(list(weights), dt)  # (sum out, in), for this call only
            bias = None
            if any(b is not None for b in biases):
                bias = _cat([torch.zeros(out, dtype=dt, device=x.device) if b is None else b
                             for (out, _, _), b in zip(spec, biases, strict=True)], dt)
            y = F.linear(x2, w, bias)  # (N, sum out)
            hs = a_ = None
            bs = []  # (out_i, r_i) each, in dt
            if lora:
                assert a_cat is not None and b_flat is not None  # a module has an adapter
                a_ = a_cat.to(dt)  # (R, in), R = the ranks summed
                scales = torch.cat([torch.full((r,), s, dtype=dt, device=x.device)
                                    for _, r, s in spec if r])
                hs = (x2 @ a_.t()).mul_(scales)  # (N, R)
                b_ = b_flat.to(dt)
                at = 0
                for i in lora:
                    rank = ranks[i]
                    assert rank is not None  # i is in lora
                    (o0, o1), (r0, r1) = outs[i], rank
                    bs.append(b_[at:at + (o1 - o0) * (r1 - r0)].view(o1 - o0, r1 - r0))
                    at += (o1 - o0) * (r1 - r0)
                    y[:, o0:o1].addmm_(hs[:, r0:r1], bs[-1].t())
        # float32: backward reads the module weights themselves (no concatenated copy kept);
        # under a cast the slices of the cast buffer are the copy autocast would keep anyway.
        saved_w = weights if w.dtype == weights[0].dtype else w.split([o for o, _, _ in spec])
        ctx.save_for_backward(x2 if lora else None, hs, a_, *saved_w, *bs)
        ctx.spec, ctx.dt, ctx.in_shape, ctx.x_dtype = spec, dt, x.shape, x.dtype
        ctx.a_dtype = None if a_cat is None else a_cat.dtype
        ctx.b_dtype = None if b_flat is None else b_flat.dtype
        # One output per module (views into y): backward gets each gradient as it is, with no
        # (N, sum out) concatenation of them.
        return y.view(*x.shape[:-1], y.shape[-1]).split([o for o, _, _ in spec], dim=-1)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x2, hs, a, *rest = ctx.saved_tensors
        spec, n = ctx.spec, len(ctx.spec)
        weights, bs = rest[:n], rest[n:]
        _, ranks = _slices(spec)
        lora = [i for i, rk in enumerate(ranks) if rk is not None]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        with torch.autocast(grads[0].device.type, enabled=False):
            gs = [g.reshape(-1, g.shape[-1]).to(ctx.dt) for g in grads]  # (N, out_i) each
            gh = None
            if lora:
                gh = torch.cat([(gs[i] @ b).mul_(spec[i][2])
                                for i, b in zip(lora, bs, strict=True)], dim=1)  # (N, R)
            if need_x:
                grad_x = gs[0] @ weights[0].to(ctx.dt)  # (N, in)
                for g, w in zip(gs[1:], weights[1:], strict=True):
                    grad_x.addmm_(g, w.to(ctx.dt))
                if gh is not None:
                    grad_x.addmm_(gh, a)
                grad_x = grad_x.view(ctx.in_shape).to(ctx.x_dtype)
            if need_a:  # A's need a gradient only when there are A's: gh is set
                assert gh is not None
                grad_a = (gh.t() @ x2).to(ctx.a_dtype)  # (R, in)
            if need_b:  # each (out_i, r_i) = (hs_i^T g_i)^T, flattened as b_flat is
                spans = [rank for rank in (ranks[i] for i in lora) if rank is not None]
                grad_b = torch.cat([(hs[:, r0:r1].t() @ gs[i]).t().reshape(-1)
                                    for i, (r0, r1) in zip(lora, spans, strict=True)]
                                   ).to(ctx.b_dtype)
        return grad_x, grad_a, grad_b, None, None, None, None
