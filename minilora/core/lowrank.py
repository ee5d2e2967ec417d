"""The low-rank linear kernel: y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T, one autograd node.

One Linear with one LoRA adapter (minilora.lora.layer.LoRALinear) and a group of sibling Linears
reading one input (q/k/v, gate/up: minilora.model.fused) compute the same formula, so they run
the same kernel: a single layer is the group of one. It lives here, a pure-tensor function that
knows no module, because minilora.model and minilora.lora may not import each other and both call
it. The readable definition it must equal is LoRALinear.reference_forward; the tests hold it to
that in float32, float64, bf16 autocast, with dropout, and with a trainable base weight.

`compute_dtype` is the one place that decides the dtype a product runs in under autocast.

Why one node with a hand-written backward instead of composing F.linear calls:
- each update is added into its slice of the base output in place (`addmm_`) and autograd never
  sees it, so backward needs no output-sized clone (an in-place add on a Linear's output makes
  autograd record CopySlices, which copies the whole gradient);
- each skinny product runs in its fast orientation: grad_B = (hs^T g)^T, [r, N] @ [N, out],
  which MKL/oneDNN run several times faster than [out, N] @ [N, r];
- grad_x is one buffer: g_i W_i summed, plus g_h A, added in place (no (N, in) tensor per
  module for autograd to add up);
- the scaling is folded into the rank-r intermediate, never into an output-sized tensor;
- under autocast the kernel runs in the autocast dtype: A and B are cast once per call
  (r x in and out x r, tiny), no float32 output-sized temporaries; with several modules the
  weights are cast into one buffer, the copy autocast makes of each weight anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The dtypes autocast casts a product's operands from (it leaves float64 alone).
AUTOCAST_FROM = (torch.float32, torch.bfloat16, torch.float16)

# Per module: (A (r, in), B (out, r), scale), or None for the base alone.
Adapter = tuple[Tensor, Tensor, float] | None


def autocast_dtype_for(device_type: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype autocast runs a product of `dtype` operands in on `device_type`: its dtype
    when autocast is on there and casts `dtype`, else None (autocast off, or float64)."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4
        return None
    if not torch.is_autocast_enabled(device_type) or dtype not in AUTOCAST_FROM:
        return None
    return torch.get_autocast_dtype(device_type)


def compute_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype `lowrank_linear` computes in for input x and weights of `weight_dtype`, the
    dtype F.linear would compute in: the autocast dtype under autocast, else the weights'
    dtype when x has it too. None where the kernel must not run: autocast leaving float64
    alone, dtypes that differ (F.linear refuses them), an integer (quantized) weight."""
    cast = autocast_dtype_for(x.device.type, weight_dtype)
    if torch.is_autocast_enabled(x.device.type):
        return cast
    return weight_dtype if x.dtype == weight_dtype and weight_dtype.is_floating_point else None


def lowrank_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                   adapters: Sequence[Adapter], dt: torch.dtype,
                   xa: Tensor | None = None) -> tuple[Tensor, ...]:
    """y_i = x W_i^T + b_i + s_i (xa A_i^T) B_i^T for every module i, as one autograd node.

    Args:
        x: (..., in) the input every module reads.
        weights: W_i (out_i, in) each; a trainable one gets its gradient.
        biases: b_i (out_i,) or None each.
        adapters: (A_i (r_i, in), B_i (out_i, r_i), s_i) or None (the base alone) each.
        dt: the dtype to compute in (see `compute_dtype`).
        xa: the adapters' input when it differs from x (dropout), else None.

    Returns:
        One (..., out_i) tensor per module (views into one output when several).
    """
    spec = tuple((w.shape[0], ad[0].shape[0] if ad else 0, float(ad[2]) if ad else 0.0)
                 for w, ad in zip(weights, adapters, strict=True))
    a_s = [ad[0] for ad in adapters if ad]
    b_s = [ad[1] for ad in adapters if ad]
    out = _LowRankLinear.apply(x, xa, dt, spec, *weights, *biases, *a_s, *b_s)
    return (out,) if len(spec) == 1 else out


def _slices(spec: tuple[Any, ...]) -> tuple[list[tuple[int, int]], list[tuple[int, int] | None]]:
    """Each module's columns of the output and of the stacked rank-r product."""
    outs, ranks, o, r = [], [], 0, 0
    for out, rank, _ in spec:
        outs.append((o, o + out))
        ranks.append((r, r + rank) if rank else None)
        o, r = o + out, r + rank
    return outs, ranks


def _cat(tensors: Sequence[Tensor], dt: torch.dtype) -> Tensor:
    """torch.cat along dim 0, cast to dt in the same pass (one write); one tensor is only cast
    (no copy when it has dt already)."""
    if len(tensors) == 1:
        return tensors[0].to(dt)
    out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=dt,
                      device=tensors[0].device)
    row = 0
    for t in tensors:
        out[row:row + t.shape[0]].copy_(t)
        row += t.shape[0]
    return out


class _LowRankLinear(torch.autograd.Function):
    """See lowrank_linear; inputs (x, xa, dt, spec, *weights, *biases, *A's, *B's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, xa: Tensor | None, dt: torch.dtype,
                spec: tuple[Any, ...], *params: Any) -> Any:
        n = len(spec)
        outs, ranks = _slices(spec)
        lora = [i for i, rk in enumerate(ranks) if rk is not None]
        k = len(lora)
        weights, biases = params[:n], params[n:2 * n]
        a_s, b_s = params[2 * n:2 * n + k], params[2 * n + k:]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (N, in)
            xa2 = x2 if xa is None else xa.reshape(-1, xa.shape[-1]).to(dt)
            w = _cat(weights, dt)  # (sum out, in), for this call only when n > 1
            bias = None
            if any(b is not None for b in biases):
                bias = _cat([torch.zeros(out, dtype=dt, device=x.device) if b is None else b
                             for (out, _, _), b in zip(spec, biases, strict=True)], dt)
            y = F.linear(x2, w, bias)  # (N, sum out)
            hs = a_ = None
            bs = [b.to(dt) for b in b_s]  # (out_i, r_i) each
            if lora:
                a_ = _cat(a_s, dt)  # (R, in), R = the ranks summed
                hs = xa2 @ a_.t()  # (N, R)
                if k == 1:
                    hs.mul_(spec[lora[0]][2])
                else:
                    hs.mul_(torch.cat([torch.full((r,), s, dtype=dt, device=x.device)
                                       for _, r, s in spec if r]))
                for i, b in zip(lora, bs, strict=True):
                    rank = ranks[i]
                    assert rank is not None  # i is in lora
                    (o0, o1), (r0, r1) = outs[i], rank
                    (y if n == 1 else y[:, o0:o1]).addmm_(hs[:, r0:r1], b.t())
        # backward reads the weights themselves when no cast was made (no concatenated copy
        # kept); under a cast the slices of the cast buffer are the copy autocast keeps anyway.
        saved_w = weights if w.dtype == weights[0].dtype else w.split([o for o, _, _ in spec])
        need_w = any(p is not None and p.requires_grad for p in params[:2 * n])
        # x for grad_W and for grad_A (when the adapters read x itself), xa for grad_A otherwise
        ctx.save_for_backward(x2 if need_w or (lora and xa is None) else None,
                              None if xa is None else xa2, hs, a_, *saved_w, *bs)
        ctx.spec, ctx.dt, ctx.in_shape, ctx.shared = spec, dt, x.shape, xa is None
        ctx.dtypes = tuple(None if p is None else p.dtype for p in (x, xa, *params))
        if n == 1:
            return y.view(*x.shape[:-1], y.shape[-1])
        # One output per module (views into y): backward gets each gradient as it is, with no
        # (N, sum out) concatenation of them.
        return y.view(*x.shape[:-1], y.shape[-1]).split([o for o, _, _ in spec], dim=-1)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        x2, xa2, hs, a, *rest = ctx.saved_tensors
        spec, n = ctx.spec, len(ctx.spec)
        weights, bs = rest[:n], rest[n:]
        _, ranks = _slices(spec)
        lora = [i for i, rk in enumerate(ranks) if rk is not None]
        k = len(lora)
        need = ctx.needs_input_grad
        x_dtype, xa_dtype, *dtypes = ctx.dtypes
        if xa2 is None:
            xa2 = x2
        grad_x = grad_xa = None
        grad_w: list[Tensor | None] = [None] * n
        grad_bias: list[Tensor | None] = [None] * n
        grad_a: list[Tensor | None] = [None] * k
        grad_b: list[Tensor | None] = [None] * k
        with torch.autocast(grads[0].device.type, enabled=False):
            gs = [g.reshape(-1, g.shape[-1]).to(ctx.dt) for g in grads]  # (N, out_i) each
            gh = None
            if lora:
                gh = torch.cat([(gs[i] @ b).mul_(spec[i][2])
                                for i, b in zip(lora, bs, strict=True)], dim=1)  # (N, R)
            if need[0]:
                grad_x = gs[0] @ weights[0].to(ctx.dt)  # (N, in)
                for g, w in zip(gs[1:], weights[1:], strict=True):
                    grad_x.addmm_(g, w.to(ctx.dt))
                if gh is not None and ctx.shared:
                    grad_x.addmm_(gh, a)
                grad_x = grad_x.view(ctx.in_shape).to(x_dtype)
            if need[1]:
                grad_xa = (gh @ a).view(ctx.in_shape).to(xa_dtype)
            for i in range(n):
                if need[4 + i]:  # a trainable base weight (LoRA beside full fine-tuning)
                    grad_w[i] = (gs[i].t() @ x2).to(dtypes[i])  # (out_i, in)
                if need[4 + n + i]:
                    grad_bias[i] = gs[i].sum(0).to(dtypes[n + i])
            spans = [rank for rank in (ranks[i] for i in lora) if rank is not None]
            if lora and any(need[4 + 2 * n:4 + 2 * n + k]):
                assert gh is not None  # there are adapters
                ga = gh.t() @ xa2  # (R, in)
                for j, (r0, r1) in enumerate(spans):
                    grad_a[j] = ga[r0:r1].to(dtypes[2 * n + j])
            for j, (i, (r0, r1)) in enumerate(zip(lora, spans, strict=True)):
                if need[4 + 2 * n + k + j]:  # (out_i, r_i) = (hs_i^T g_i)^T
                    grad_b[j] = (hs[:, r0:r1].t() @ gs[i]).t().to(dtypes[2 * n + k + j])
        return (grad_x, grad_xa, None, None, *grad_w, *grad_bias, *grad_a, *grad_b)
