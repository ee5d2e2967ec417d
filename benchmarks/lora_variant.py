"""A local variant of minilora's LoRA layer, measured beside the real one (benchmark row
``minilora-local``); lora.py is not changed by the benchmark.

What differs from ``minilora.lora.LoRALinear``: the whole layer is one autograd Function.
- Forward: y = x W^T + b, then ``y.addmm_(x A^T, B^T, alpha=scaling)`` in place. Inside the
  Function the in-place add is invisible to autograd, so backward needs no CopySlices clone of the
  output gradient (the real layer's in-place add on a view of the Linear's output costs one
  output-sized clone per layer in backward).
- Backward computed by hand in the fast orientation of each skinny product:
  grad_B = (h^T g)^T ([r, N] @ [N, out], not [out, N] @ [N, r], which MKL runs several times
  slower here), grad_A = (s g B)^T x, grad_x = g W + (s g B) A (one addmm_, no extra tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LoRAFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, weight, bias, a, b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        h = x2 @ a.t()  # (N, r)
        y = F.linear(x2, weight, bias)  # (N, out)
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, weight, a, b)
        ctx.scaling, ctx.shape = scaling, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):
        x2, h, weight, a, b = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gh = (g2 @ b).mul_(ctx.scaling)  # (N, r)
        grad_b = (h.t() @ g2).t().mul_(ctx.scaling)  # (out, r)
        grad_a = gh.t() @ x2  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).addmm_(gh, a).view(ctx.shape)  # (..., in)
        return grad_x, None, None, grad_a, grad_b, None


class LocalLoRALinear(nn.Module):
    """Frozen Linear + scaling * B A, as one autograd Function (training path only)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_A.weight, std=0.02)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LoRAFunction.apply(x, self.weight, self.bias, self.lora_A.weight,
                                   self.lora_B.weight, self.scaling)


def inject_local(model: nn.Module, r: int, alpha: float, targets) -> list[nn.Parameter]:
    """Replaces the targeted Linears (all but lm_head, or name suffixes); returns A and B."""
    chosen = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name.split(".")[-1] == "lm_head":
            continue
        if targets == "all-linear" or name.split(".")[-1] in targets:
            chosen.append(name)
    params = []
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LocalLoRALinear(getattr(owner, leaf), r, alpha)
        setattr(owner, leaf, layer)
        params += [layer.lora_A.weight, layer.lora_B.weight]
    return params
