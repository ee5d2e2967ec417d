"""The decoder's feed-forward layers: the gated MLP (SwiGLU) and MiniMind's mixture of experts
with its load-balancing auxiliary loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilora.model.config import ModelConfig, filled
from minilora.model.fused import project


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        C, F_ = config.hidden_size, intermediate_size or filled(config.intermediate_size)
        self.fuse_projections = True  # gate/up as one product (see fused.py)
        self.gate_proj = nn.Linear(C, F_, bias=False)
        self.up_proj = nn.Linear(C, F_, bias=False)
        self.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project((self.gate_proj, self.up_proj), x,
                           self.fuse_projections)  # (..., F) each, one product
        return self.down_proj(F.silu(gate) * up)  # (..., C)


class MoEGate(nn.Module):
    """MiniMind's router: softmax over experts, top-k, and the load-balancing loss.

    ``weight`` is a bare Parameter (num_experts, hidden) as in MiniMind, not an nn.Linear, so
    "all-linear" LoRA targeting leaves the router alone. The generation decides two rules:
    minimind3 renormalises the top-k weights whenever ``norm_topk_prob`` (top-1 too, so the one
    expert's weight is 1), MiniMind2 only when top-k > 1; and the aux loss (below).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.num_experts
        self.norm_topk_prob, self.alpha = config.norm_topk_prob, config.router_aux_loss_coef
        self.seq_aux, self.generation = config.seq_aux, config.minimind_generation
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        scores = F.linear(x.reshape(-1, C), self.weight).softmax(dim=-1)  # (N, E), N = B*T
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # (N, K)
        if self.norm_topk_prob and (self.top_k > 1 or self.generation == "minimind3"):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        # As MiniMind: the balancing loss exists while training only.
        if self.training and self.alpha > 0:
            idx = topk_idx.view(B, -1)  # (B, T*K)
            if self.generation == "minimind3":
                # load[j, e]: share of tokens whose j-th choice is e; pbar: mean routing prob
                load = F.one_hot(topk_idx, self.n_experts).to(scores.dtype).mean(0)  # (K, E)
                aux = (load * scores.mean(0)).sum() * self.n_experts * self.alpha
            elif self.seq_aux:
                # per sequence: expert load (normalised so uniform = 1) times mean routing prob
                load = torch.zeros(B, self.n_experts, device=x.device, dtype=scores.dtype)
                load.scatter_add_(1, idx, torch.ones_like(idx, dtype=scores.dtype))
                load = load / (T * self.top_k / self.n_experts)  # (B, E)
                prob = scores.view(B, T, -1).mean(dim=1)  # (B, E)
                aux = (load * prob).sum(dim=1).mean() * self.alpha
            else:
                frac = F.one_hot(idx.reshape(-1), self.n_experts).float().mean(0)  # (E,)
                aux = (scores.mean(0) * frac * self.n_experts).sum() * self.alpha
        return topk_idx, topk_weight, aux


class MoE(nn.Module):
    """Routed experts (top-k of ``experts``) plus ``shared_experts`` every token goes through."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(
            MLP(config) for _ in range(filled(config.n_shared_experts)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        topk_idx, topk_weight, aux = self.gate(x)  # (N, K), (N, K), ()
        flat = x.reshape(-1, C)  # (N, C)
        y = torch.zeros_like(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(topk_idx == e)  # (n_e,), (n_e,)
            if token.numel() == 0:
                if self.training:
                    # As MiniMind: an expert no token reached stays in the graph, so it gets a
                    # zero gradient (clipped and stepped with the rest) rather than none.
                    y = y + 0 * sum(p.sum() for p in expert.parameters())
                continue
            out = expert(flat[token]) * topk_weight[token, slot, None].to(x.dtype)  # (n_e, C)
            y = y.index_add(0, token, out)
        y = y.view(B, T, C)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux
