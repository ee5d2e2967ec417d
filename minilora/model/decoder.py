"""A Llama-family decoder (MiniMind, Llama, Qwen2, Qwen3) with Hugging Face module names.

Reads top to bottom: building blocks (RMSNorm, rotary embedding, attention), the decoder block,
the model. Parameter names and shapes are those of transformers'
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` and MiniMind's
``MiniMindForCausalLM``, so their checkpoints load one to one (see weights.py). The config lives in
model_config.py, the MLP and MoE in feed_forward.py, the fused q/k/v and gate/up products in
fused.py, the KV cache in kv_cache.py, sampling and generation in generation.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minilora.core.lowrank import autocast_dtype_for
from minilora.model.config import ModelConfig, filled
from minilora.model.feed_forward import MLP, MoE
from minilora.model.fused import project
from minilora.model.kv_cache import KVCache
from minilora.model.loss import linear_cross_entropy, linear_log_probs

# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # (..., C), one kernel
            # Under autocast every Linear reading y would cast it to the low dtype on its own
            # (q, k, v and each LoRA A: up to seven copies); cast it once here instead.
            low = autocast_dtype_for(x.device.type, torch.float32)
            return y if low is None else y.to(low)
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)  # (..., C)
        return self.weight * y  # in the input dtype, as transformers does


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary positions, built in float32 and grown on demand.

    The table is a plain attribute, not a buffer: ``model.to(torch.bfloat16)`` would otherwise
    round the angles, and it must never enter a state_dict. With ``scaling`` (MiniMind's YaRN)
    and a table length (``max_positions``) past ``original_max_position_embeddings``, each
    frequency is blended towards freq / factor along a linear ramp over the dimensions, and cos
    and sin are multiplied by ``attention_factor``.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                 max_positions: int = 0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.scaling, self.max_positions = scaling, max_positions
        self._cos = self._sin = torch.empty(0)

    def inv_freq(self, device: torch.device | None = None) -> tuple[Tensor, float]:
        """The (D/2,) inverse frequencies and the factor cos and sin are scaled by."""
        D = self.head_dim
        exponent = torch.arange(0, D, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / D))  # (D/2,)
        s = self.scaling
        if s is None:
            return inv_freq, 1.0
        orig = s["original_max_position_embeddings"]
        if self.max_positions > orig:
            # D(b): the dimension index whose wavelength fits b turns into orig positions
            def dim_of(b: float) -> float:
                return D * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(self.theta))

            low = max(math.floor(dim_of(s["beta_fast"])), 0)
            high = min(math.ceil(dim_of(s["beta_slow"])), D // 2 - 1)
            i = torch.arange(D // 2, device=device).float()
            ramp = ((i - low) / max(high - low, 0.001)).clamp(0, 1)  # (D/2,)
            inv_freq = inv_freq * (1 - ramp + ramp / s["factor"])
        return inv_freq, float(s["attention_factor"])

    @torch.inference_mode(False)  # tables made while generating must still serve training
    @torch.no_grad()
    def _grow(self, length: int, device: torch.device) -> None:
        length = max(length, 2 * self._cos.shape[0], 256)
        inv_freq, attention_factor = self.inv_freq(device)  # (D/2,)
        pos = torch.arange(length, dtype=torch.int64, device=device).float()
        freqs = torch.outer(pos, inv_freq)  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        self._cos, self._sin = emb.cos(), emb.sin()
        if attention_factor != 1.0:
            self._cos, self._sin = self._cos * attention_factor, self._sin * attention_factor

    def forward(self, start: int, length: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[Tensor, Tensor]:
        end = start + length
        if self._cos.shape[0] < end or self._cos.device != device:
            self._grow(end, device)
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)  # (T, D) each

    def at(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin at each row's own positions (B, T), shaped (B, 1, T, D) for every head."""
        end = int(positions.max()) + 1
        if self._cos.shape[0] < end or self._cos.device != positions.device:
            self._grow(end, positions.device)
        return self._cos[positions][:, None].to(dtype), self._sin[positions][:, None].to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin  # (B, H, T, D)


def _low_precision_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                             start: int) -> Tensor:
    """Causal GQA attention as two batched matrix products, for bf16/fp16 q, k, v.

    On the CPU, scaled_dot_product_attention's flash kernel runs bf16 about 3 times slower than
    these two bmm calls (the scores of one sequence are small: T x S), and the grouped query
    heads fold into the rows of one product, so k and v are never repeated. The scores are
    rounded to the input dtype before the softmax, as any bf16 eager attention does.
    """
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    if mask is None:  # causal: query t (at position start + t) sees keys 0..start + t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(start)[None, None]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~mask, float("-inf"))  # (B or 1, 1, T, S)
    bias = bias[:, :, None]  # (B or 1, 1, 1, T, S)
    if bias.shape[0] == 1:  # the same for every sequence: one (G*T, S) bias, broadcast
        bias = bias.expand(1, 1, G, T, S).reshape(G * T, S)
    else:
        bias = bias.expand(B, KV, G, T, S).reshape(B * KV, G * T, S)
    scores = torch.baddbmm(bias, q.reshape(B * KV, G * T, D), k.reshape(B * KV, S, D).mT,
                           alpha=D ** -0.5)  # (B*KV, G*T, S)
    y = torch.bmm(scores.softmax(-1), v.reshape(B * KV, S, D))  # (B*KV, G*T, D)
    return y.view(B, H, T, D)


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = filled(config.num_key_value_heads)
        self.head_dim = filled(config.head_dim)
        C, D = config.hidden_size, self.head_dim
        bias = config.attention_bias
        self.fuse_projections = True  # q/k/v as one product (see fused.py)
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        # Qwen2 puts biases on q/k/v only; Llama and Qwen3's attention_bias covers o too.
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=bias and config.model_type != "qwen2")
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer: int, start: int) -> Tensor:
        B, T, _ = x.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x,
                          self.fuse_projections)  # one product, see fused.py
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, KV, T, D)
        # its own memory: a view of the fused q/k/v output would keep all of it for backward
        v = v.transpose(1, 2).contiguous()  # (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, KV, S, D), S = start + T
        low = autocast_dtype_for(x.device.type, torch.float32)  # what autocast makes of q, k, v
        if low is not None and T > 1:
            # RoPE ran in float32 (cos/sin in x's dtype); autocast would run the attention's
            # matrix products in its low dtype anyway, and the bf16 path below is the fast one.
            q, k, v = q.to(low), k.to(low), v.to(low)
        if q.dtype != torch.float32 and T > 1:
            y = _low_precision_attention(q, k, v, mask, start)  # (B, H, T, D)
        else:
            # Without a mask the causal fast path applies when queries and keys start together;
            # a single new query (decoding) sees every cached key, so it needs no mask at all.
            causal = False
            if mask is None and start == 0 and T > 1:  # a bool, where T may be symbolic (compile)
                causal = True
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
                enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm decoder block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.use_moe = config.use_moe
        self.mlp = MoE(config) if config.use_moe else MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, start: int) -> tuple[Tensor, Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer, start)
        if not self.use_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        h, aux = self.mlp(self.post_attention_layernorm(x))  # (B, T, C), ()
        return x + h, aux


class Decoder(nn.Module):
    """Embeddings, the blocks and the final norm (transformers' ``model`` submodule)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(filled(config.head_dim), config.rope_theta,
                                      config.rope_scaling, config.max_position_embeddings)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


@dataclass
class CausalLMOutput:
    """What ``CausalLM.forward`` returns: ``logits``, ``loss``, ``aux_loss``, ``past_key_values``.

    logits: (B, T, V), or (B, logits_to_keep, V). With labels the loss needs the logits of the
    counted positions only, so the full tensor is computed on first access of ``logits``: in
    most SFT batches most positions are masked, and training never reads it.
    loss: masked cross-entropy, 0-dim; None without labels.
    aux_loss: MoE load-balancing loss, 0-dim; 0 without MoE or outside training.
    past_key_values: the cache, when use_cache or past_key_values was given.
    """

    _logits: Tensor | None
    loss: Tensor | None
    aux_loss: Tensor
    past_key_values: KVCache | None
    _make_logits: Callable[[], Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            assert self._make_logits is not None  # set whenever _logits is left None
            self._logits, self._make_logits = self._make_logits(), None
        return self._logits


class CausalLM(nn.Module):
    """Decoder-only language model with a (tied or separate) ``lm_head``.

    Args:
        config: the hyper-parameters.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Recompute each block in backward instead of keeping its activations (see forward).
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # transformers' init for these models: N(0, 0.02) weights, zero biases, unit norms.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, logits_to_keep: int = 0,
                segment_ids: Tensor | None = None,
                position_ids: Tensor | None = None) -> CausalLMOutput:
        """Runs the model.

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) targets aligned with input_ids the Hugging Face way (the model shifts:
                logits[:, t] predicts labels[:, t + 1]); -100 marks positions not counted.
            attention_mask: (B, S) 1 for real tokens, 0 for padding, S = cached length + T. Right
                padding only: positions count from 0 whatever the mask says.
            past_key_values: a KVCache to read from and append to.
            use_cache: start a new KVCache when past_key_values is None.
            logits_to_keep: compute the logits of the last this-many positions only (0 = all).
            segment_ids: (B, T) for packed rows: which sample each token belongs to (1, 2, ...;
                0 on padding). A token attends only within its sample and positions restart at
                0 in each, so every sample computes what it computes alone. No cache with it.
            position_ids: (B, T) each token's rotary position, for a batch whose rows stand at
                different points (a serving batch); None: cached length + 0, 1, ... for every row.

        Returns:
            CausalLMOutput: logits, loss (mean over counted tokens; 0 when none is counted),
            aux_loss (0-dim) and the cache. loss does not include aux_loss.

        Raises:
            ValueError: on mismatched shapes, or when logits_to_keep is used with labels (a
                programming mistake, not a user's input: it keeps its traceback).
        """
        B, T = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config, B, T, device=input_ids.device,
                            dtype=self.model.embed_tokens.weight.dtype)
        start = cache.length if cache is not None else 0
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids {(B, T)}")
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep needs labels=None (the loss reads every position)")
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin, mask = self._positions(x, attention_mask, segment_ids, position_ids, cache,
                                         start)
        x, aux_loss = self._blocks(x, cos, sin, mask, cache, start)  # (B, T, C), ()
        if cache is not None:
            cache.length = start + T
        if labels is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]  # (B, k, C)
            logits = self.lm_head(self.model.norm(x))  # (B, T, V)
            return CausalLMOutput(logits, None, aux_loss, cache)
        return CausalLMOutput(None, self._loss(x, labels), aux_loss, cache,
                              lambda: self.lm_head(self.model.norm(x)))

    def sequence_log_probs(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's summed log-probability of its counted labels (a preference loss's input).

        The head runs only on the counted positions, in chunks (model/loss.py): the (tokens x
        vocabulary) logits never exist whole.

        Args:
            input_ids: (B, T) token ids, right-padded (no mask needed: padding comes after).
            labels: (B, T) aligned with input_ids the Hugging Face way; -100 where not counted.

        Returns:
            ((B,) float32 sums of log p(labels[t + 1] | tokens up to t), the 0-dim aux_loss).

        Raises:
            ValueError: on mismatched shapes (a programming mistake, not a user's).
        """
        B, T = input_ids.shape
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids {(B, T)}")
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin, mask = self._positions(x, None, None, None, None, 0)
        x, aux_loss = self._blocks(x, cos, sin, mask, None, 0)  # (B, T, C), ()
        targets = labels[:, 1:]  # (B, T-1): position t predicts labels[t + 1]
        counted = targets != -100  # (B, T-1)
        h = self.model.norm(x[:, :-1][counted])  # (N, C)
        head = self._head_linear()
        if head is not None:
            logps = linear_log_probs(h, head[0], head[1], targets[counted])  # (N,)
        else:  # a wrapped head (LoRA on lm_head, a quantized one) computes its own logits
            logps = -F.cross_entropy(self.lm_head(h).float(), targets[counted], reduction="none")
        row = torch.arange(B, device=input_ids.device)[:, None].expand_as(counted)[counted]
        sums = torch.zeros(B, dtype=torch.float32, device=input_ids.device)
        return sums.index_add(0, row, logps), aux_loss

    def _head_linear(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight, bias) when the head computes a plain linear map: an nn.Linear, or a wrapper
        that says which map it computes (``linear_weight()``, e.g. a head whose chosen rows
        train); None for a head that must run itself (LoRA on it, a quantized one)."""
        if type(self.lm_head) is nn.Linear:
            return self.lm_head.weight, self.lm_head.bias
        said = getattr(self.lm_head, "linear_weight", None)
        return said() if callable(said) else None

    def _positions(self, x: Tensor, attention_mask: Tensor | None, segment_ids: Tensor | None,
                   position_ids: Tensor | None, cache: KVCache | None, start: int
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The rotary cos/sin and the attention mask of this forward's tokens."""
        B, T = x.shape[:2]
        if segment_ids is not None:
            if cache is not None or position_ids is not None or segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must be (batch, tokens) = {(B, T)} and come "
                                  "without a cache or position_ids")
            position_ids = _segment_positions(segment_ids)  # (B, T)
        if position_ids is None:
            cos, sin = self.model.rotary(start, T, x.device, x.dtype)  # (T, D)
        elif segment_ids is not None:  # positions restart per sample, all below T: no host sync
            cos, sin = self.model.rotary(0, T, x.device, x.dtype)  # (T, D)
            cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]  # (B, 1, T, D)
        else:
            cos, sin = self.model.rotary.at(position_ids, x.dtype)  # (B, 1, T, D)
        if segment_ids is None:
            mask = self._attention_mask(attention_mask, B, T, start, x.device)  # (B, 1, T, S)|None
        else:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril())[:, None]
        return cos, sin, mask

    def _blocks(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, start: int) -> tuple[Tensor, Tensor]:
        """The residual stream through every block, and the summed MoE aux loss."""
        aux_loss = x.new_zeros((), dtype=torch.float32)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute and cache is None:
                # Non-reentrant: the recompute replays the saved RNG (LoRA dropout draws the same
                # mask) and autocast state, and custom autograd nodes (LoRA's) recompute as is.
                x, aux = checkpoint(block, x, cos, sin, mask, None, start, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, mask, cache, start)  # (B, T, C)
            if aux is not None:
                aux_loss = aux_loss + aux
        return x, aux_loss

    def _loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the counted labels, the head computed only where one counts."""
        # Position t predicts labels[t + 1].
        targets = labels[:, 1:]  # (B, T-1)
        counted = targets != -100  # (B, T-1)
        if torch.compiler.is_compiling():
            # Every position through the head, -100 ignored: the counted gather's size depends on
            # the data, which a compiled step would recompile for (see minilora/compiled.py).
            logits = self.lm_head(self.model.norm(x[:, :-1])).float()  # (B, T-1, V)
            total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        elif (head := self._head_linear()) is not None:  # head + loss in chunks: no (N, V) logits
            h = self.model.norm(x[:, :-1][counted])  # (N, C), N counted positions
            total = linear_cross_entropy(h, head[0], head[1], targets[counted])
        else:  # a wrapped head (LoRA on lm_head, a quantized one) computes its own logits
            h = self.model.norm(x[:, :-1][counted])  # (N, C), N counted positions
            total = F.cross_entropy(self.lm_head(h).float(), targets[counted], reduction="sum")
        return total / counted.sum().clamp(min=1)  # 0 when nothing is counted

    @staticmethod
    def _attention_mask(attention_mask: Tensor | None, B: int, T: int, start: int,
                        device: torch.device) -> Tensor | None:
        """Boolean (B, 1, T, S) mask, True where a query may attend, or None for the fast paths."""
        S = start + T
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)}: expected "
                                 f"(batch, cached + new tokens) = {(B, S)}")
            if bool(attention_mask.all()):
                attention_mask = None
        if attention_mask is None and (start == 0 or T == 1):
            return None  # is_causal, or one query that sees every key
        q_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            # A padded query still attends to itself, so no row is empty (an empty row is NaN).
            mask = mask & attention_mask.bool()[:, None, None, :] | (k_pos == q_pos)  # (B, 1, T, S)
        return mask


def _segment_positions(segment_ids: Tensor) -> Tensor:
    """(B, T) position of each token within its segment: 0 where a new segment starts."""
    T = segment_ids.shape[1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)
