"""The output head and cross-entropy in chunks of positions: the (N, V) logits never exist whole.

For a Qwen-sized vocabulary (151,936) the logits of 2048 positions are 1.2 GB in float32, more
than the rest of a small model's step. ``linear_cross_entropy`` computes ``h @ W^T (+ b)`` and the
cross-entropy a chunk of rows at a time. When a gradient is wanted it is computed in the same
pass, chunk by chunk (softmax minus the one-hot target, then the two products), as Liger's fused
linear cross-entropy does: the backward then only scales the stored gradients, so nothing is
recomputed and no chunk's logits outlive it. What stays is the gradient of h (N, C) and, when the
head is trained, of W (V, C): the sizes of h and W, not of the logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minilora.core.lowrank import autocast_dtype_for

# Logit elements per chunk: 32 Mi float32 elements (128 MiB). Smaller chunks re-read W (V x C)
# more often, which is what a chunk costs; larger ones hold more logits at once.
CHUNK_ELEMENTS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) in chunks of rows, computed in dtype ``dt``."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                rows: int, dt: torch.dtype, grad: bool) -> Tensor:
        # grad: whether a backward will come (decided by the caller: forward runs without grad)
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)  # (V, C)
            b = None if bias is None else bias.to(dt)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if grad and need_h else None  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) \
                if grad and need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) \
                if grad and need_b and bias is not None else None  # need_b: bias is not None
            for s in range(0, h.shape[0], rows):
                hc, tc = h[s:s + rows].to(dt), targets[s:s + rows]  # (n, C), (n,)
                logits = F.linear(hc, w, b).float()  # (n, V): the only logits alive
                lse = logits.logsumexp(-1)  # (n,)
                total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
                if not grad:
                    continue
                # d(sum CE)/d logits = softmax - one_hot(target), built in the logits' memory
                d = logits.sub_(lse[:, None]).exp_()
                d[torch.arange(d.shape[0], device=d.device), tc] -= 1
                d = d.to(dt)
                if grad_h is not None:
                    grad_h[s:s + rows] = d @ w
                if grad_w is not None:
                    grad_w += (d.t() @ hc).float()  # (V, C), summed over chunks in float32
                if grad_b is not None:
                    grad_b += d.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = None if grad_h is None else grad_h * g.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * g).to(w_dtype)
        gb = None if grad_b is None else (grad_b * g).to(b_dtype)
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         rows: int | None = None) -> Tensor:
    """Summed cross-entropy of the logits ``h @ weight.T + bias`` against ``targets``, in chunks.

    Equal to ``F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")``
    (and its gradients), computed in the dtype that expression computes in (the autocast dtype
    under autocast), without holding all the logits.

    Args:
        h: (N, C) hidden states of the counted positions.
        weight: (V, C) the output head's weight.
        bias: (V,) or None.
        targets: (N,) token ids, every one counted (no -100).
        rows: positions per chunk; default: as many as fit CHUNK_ELEMENTS logits.

    Returns:
        A 0-dim float32 tensor, the sum over the N positions.
    """
    if rows is None:
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    dt = autocast_dtype_for(h.device.type, weight.dtype) or weight.dtype
    grad = torch.is_grad_enabled() and (
        h.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    return _LinearCrossEntropy.apply(h, weight, bias, targets, rows, dt, grad)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h_i W^T + b)[t_i] for each row i, in chunks of rows, computed in dtype ``dt``.

    Unlike the summed cross-entropy above, each row's gradient is scaled by its own incoming
    gradient (a preference loss weighs each sequence differently), so the chunk's logits are
    recomputed in backward instead of their gradient being kept from the forward: W's gradient
    cannot be rescaled per row after the fact.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                rows: int, dt: torch.dtype) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)  # (V, C)
            b = None if bias is None else bias.to(dt)
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (N,)
            for s in range(0, h.shape[0], rows):
                logits = F.linear(h[s:s + rows].to(dt), w, b).float()  # (n, V): the only ones
                picked = logits.gather(1, targets[s:s + rows, None])[:, 0]  # (n,)
                # log-sum-exp in the logits' own memory (torch's logsumexp takes a second copy)
                top = logits.amax(-1)  # (n,)
                lse = logits.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
                out[s:s + rows] = picked - lse
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.rows, ctx.dt = rows, dt
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, bias, targets = ctx.saved_tensors
        rows, dt = ctx.rows, ctx.dt
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dt)
            b = None if bias is None else bias.to(dt)
            grad_h = torch.empty_like(h) if need_h else None  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) \
                if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) \
                if need_b else None
            for s in range(0, h.shape[0], rows):
                hc, tc, gc = h[s:s + rows].to(dt), targets[s:s + rows], g[s:s + rows].float()
                logits = F.linear(hc, w, b).float()  # (n, V)
                # d log p_t / d logits = one_hot(t) - softmax, times this row's gradient, built
                # in the logits' memory (one (n, V) float32 tensor alive, as in the forward)
                lse = logits.logsumexp(-1)  # (n,)
                d = logits.sub_(lse[:, None]).exp_().neg_()
                d[torch.arange(d.shape[0], device=d.device), tc] += 1
                d = d.mul_(gc[:, None]).to(dt)
                if grad_h is not None:
                    grad_h[s:s + rows] = d @ w
                if grad_w is not None:
                    grad_w += (d.t() @ hc).float()
                if grad_b is not None:
                    grad_b += d.float().sum(0)
        gw = None if grad_w is None else grad_w.to(weight.dtype)
        gb = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, gw, gb, None, None, None


def linear_log_probs(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     rows: int | None = None) -> Tensor:
    """Log-probability of each target under the logits ``h @ weight.T + bias``, in chunks.

    Equal to ``F.log_softmax(F.linear(h, weight, bias).float(), -1).gather(1, targets[:, None])``
    (and its gradients), computed in the dtype that expression computes in, without holding all
    the logits: the backward recomputes each chunk's logits.

    Args:
        h: (N, C) hidden states of the counted positions.
        weight: (V, C) the output head's weight.
        bias: (V,) or None.
        targets: (N,) token ids, every one counted (no -100).
        rows: positions per chunk; default: as many as fit CHUNK_ELEMENTS logits.

    Returns:
        (N,) float32 log-probabilities.
    """
    if rows is None:
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_autocast_enabled(h.device.type) and weight.dtype in (
            torch.float32, torch.bfloat16, torch.float16):
        dt = torch.get_autocast_dtype(h.device.type)
    else:
        dt = weight.dtype
    return _LinearLogProbs.apply(h, weight, bias, targets, rows, dt)
