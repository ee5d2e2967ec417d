"""A Llama-family decoder (MiniMind, Llama, Qwen2, Qwen3): HF names, a KV cache, generate.

Reads top to bottom: config, building blocks (RMSNorm, rotary embedding, attention, MLP, MoE), the
decoder block, the model, the KV cache, then generation. Parameter names and shapes are those of
transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` and MiniMind's
``MiniMindForCausalLM``, so their checkpoints load one to one (see weights.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minilora.checks import number, type_problems
from minilora.errors import ConfigError
from minilora.files import read_json
from minilora.loss import linear_cross_entropy

MODEL_TYPES = ("llama", "qwen2", "qwen3", "minimind")
# MiniMind's two generations of model file: "minimind2" (shared experts, n_routed_experts,
# aux_loss_alpha, seq_aux) and "minimind3" (its current one: q/k norm, top-1 routing renormalised,
# router_aux_loss_coef, eps 1e-6). Each one's MiniMindConfig defaults, for keys a file leaves out.
GENERATIONS = ("minimind2", "minimind3")
MINIMIND_DEFAULTS: dict[str, dict] = {
    "minimind2": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 2, "vocab_size": 6400, "rms_norm_eps": 1e-5,
                  "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
                  "qk_norm": False, "num_experts": 4, "num_experts_per_tok": 2,
                  "n_shared_experts": 1, "norm_topk_prob": True, "router_aux_loss_coef": 0.1,
                  "seq_aux": True},
    "minimind3": {"hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "vocab_size": 6400, "rms_norm_eps": 1e-6,
                  "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
                  "qk_norm": True, "num_experts": 4, "num_experts_per_tok": 1,
                  "n_shared_experts": 0, "norm_topk_prob": True, "router_aux_loss_coef": 5e-4},
}
# config.json keys only one generation writes (MiniMind2's MoE names; the current ones).
_GENERATION_KEYS = {
    "minimind2": ("n_routed_experts", "n_shared_experts", "aux_loss_alpha", "seq_aux",
                  "scoring_func"),
    "minimind3": ("num_experts", "router_aux_loss_coef", "moe_intermediate_size"),
}
# MiniMind's YaRN settings (its MiniMindConfig writes these when inference_rope_scaling is on).
YARN_DEFAULTS = {"factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 32.0,
                 "beta_slow": 1.0, "attention_factor": 1.0}


def default_intermediate_size(hidden_size: int, generation: str) -> int:
    """MiniMind's SwiGLU width rule: int(8/3 h) (MiniMind2) or h * pi (current), rounded up to
    a multiple of 64."""
    if generation == "minimind3":
        return math.ceil(hidden_size * math.pi / 64) * 64
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Model hyper-parameters under Hugging Face config.json names.

    ``from_dict`` takes these names only; ``from_hf_dict`` reads a transformers or MiniMind
    config.json (aliases such as MiniMind's ``n_routed_experts`` / ``aux_loss_alpha`` and
    transformers 5's ``rope_parameters`` included).
    """

    model_type: str = "minimind"  # "llama" | "qwen2" | "qwen3" | "minimind"
    vocab_size: int = 6400  # rows of embed_tokens and lm_head
    hidden_size: int = 512  # width of the residual stream
    # SwiGLU width; None -> the generation's MiniMind rule (default_intermediate_size)
    intermediate_size: int | None = None
    num_hidden_layers: int = 8  # decoder blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA); None -> num_attention_heads
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # longest sequence the positions were trained for
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 1e6  # rotary base
    tie_word_embeddings: bool = True  # lm_head.weight is embed_tokens.weight
    attention_bias: bool = False  # bias on q/k/v (and on o, except for qwen2, whose o has none)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (qwen3)
    bos_token_id: int | None = 1  # beginning of sequence token
    eos_token_id: int | list[int] | None = 2  # end of sequence token(s)
    pad_token_id: int | None = None  # padding token
    use_moe: bool = False  # replace every MLP by a mixture of experts
    num_experts: int = 4  # routed experts per MoE layer (MiniMind2: n_routed_experts)
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    # experts every token goes through as well; None -> 1 (minimind2), 0 (minimind3: none)
    n_shared_experts: int | None = None
    # renormalise the top-k routing weights to sum to one (minimind2: only when top-k > 1)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.1  # load-balancing loss scale (MiniMind2: aux_loss_alpha)
    seq_aux: bool = True  # minimind2: balance per sequence rather than over the batch
    # whose MoE rules (routing, aux loss, config.json keys): "minimind2" or "minimind3" (current)
    minimind_generation: str = "minimind2"
    moe_intermediate_size: int | None = None  # routed experts' width; None -> intermediate_size
    # MiniMind's YaRN (keys of YARN_DEFAULTS), applied when max_position_embeddings exceeds
    # original_max_position_embeddings; None -> plain RoPE
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        problems = type_problems(self, "")  # a float head_dim, a "false" string, a NaN eps ...
        if problems:
            raise ConfigError("; ".join(problems))
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.minimind_generation not in GENERATIONS:
            raise ConfigError(f"minimind_generation: expected one of {GENERATIONS}, got "
                              f"{self.minimind_generation!r}")
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = default_intermediate_size(self.hidden_size,
                                                               self.minimind_generation)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.n_shared_experts is None:
            self.n_shared_experts = int(self.minimind_generation == "minimind2")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim: expected a positive even int (RoPE), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps: expected > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta: expected > 0, got {self.rope_theta}")
        if self.use_moe:
            if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok: expected 1..num_experts ({self.num_experts}), "
                    f"got {self.num_experts_per_tok}")
            if self.n_shared_experts < 0:
                raise ConfigError(f"n_shared_experts: expected >= 0, got {self.n_shared_experts}")
            if self.router_aux_loss_coef < 0:
                raise ConfigError(
                    f"router_aux_loss_coef: expected >= 0, got {self.router_aux_loss_coef}")
            if self.minimind_generation == "minimind3" and self.n_shared_experts:
                raise ConfigError(
                    f"n_shared_experts: MiniMind's current MoE (minimind3) has no shared experts, "
                    f"got {self.n_shared_experts}; use minimind_generation 'minimind2'")
            if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size: expected a positive int, got "
                                  f"{self.moe_intermediate_size!r}")
            if (self.minimind_generation == "minimind2"
                    and self.moe_intermediate_size != self.intermediate_size):
                raise ConfigError(
                    f"moe_intermediate_size: MiniMind2's experts are intermediate_size "
                    f"({self.intermediate_size}) wide, got {self.moe_intermediate_size}; use "
                    f"minimind_generation 'minimind3'")
        self.rope_scaling = _check_yarn(self.rope_scaling, self.model_type)

    @property
    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence ids as a list (config.json allows one id or several)."""
        if self.eos_token_id is None:
            return []
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    def to_dict(self) -> dict:
        """Returns the fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Builds a config from minilora's field names.

        Raises:
            ValueError: on a key that is not a field (naming it and listing the valid ones).
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown ModelConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Builds a config from a transformers (llama, qwen2, qwen3) or MiniMind config.json dict.

        Keys that change nothing here (``architectures``, ``dtype``, ``use_cache`` ...) are ignored;
        settings this decoder does not implement (another activation, sliding windows, another RoPE
        scaling, MLP bias) are refused rather than silently computed wrong. A MiniMind file's
        generation is read from its keys (``MiniMind2``: ``n_routed_experts``, ``aux_loss_alpha``,
        ``seq_aux`` ...; current: ``num_experts``, ``router_aux_loss_coef`` ...) and the keys it
        leaves out take that generation's MiniMindConfig defaults.

        Raises:
            ConfigError: on an unsupported model_type or setting, naming the key, or a MiniMind
                file whose generation its keys do not tell where it matters.
        """
        model_type = d.get("model_type", "minimind")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is implemented, got {d['hidden_act']!r}")
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias: true is not implemented (MLP projections have no bias)")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window: true is not implemented")
        if d.get("scoring_func", "softmax") != "softmax":
            raise ConfigError(
                f"scoring_func: only 'softmax' is implemented, got {d['scoring_func']!r}")
        generation = _generation_from_keys(d, model_type)
        out: dict = {"model_type": model_type, "minimind_generation": generation or "minimind2"}
        if model_type == "minimind" and generation is not None:
            out.update(MINIMIND_DEFAULTS[generation])
            if generation == "minimind2":
                out["qk_norm"] = False  # its configs have no flag; load_model reads the weights
        names = {f.name for f in fields(cls)} - {"rope_scaling", "minimind_generation"}
        for key in names & set(d):
            out[key] = d[key]
        aliases = {"n_routed_experts": "num_experts", "aux_loss_alpha": "router_aux_loss_coef",
                   "use_qk_norm": "qk_norm"}
        for key, name in aliases.items():
            if key in d:
                out[name] = d[key]
        if out.get("intermediate_size") is None and isinstance(out.get("hidden_size"), int):
            out["intermediate_size"] = default_intermediate_size(out["hidden_size"],
                                                                 out["minimind_generation"])
        _read_rope(d, model_type, out)
        if model_type == "qwen2":
            out["attention_bias"] = True  # Qwen2 always has q/k/v biases; its config has no key
        if model_type == "qwen3":
            out["qk_norm"] = True
            out.setdefault("head_dim", 128)  # Qwen3Config's default, not hidden/heads
        if model_type in ("llama", "qwen2", "qwen3"):
            out.setdefault("tie_word_embeddings", False)  # transformers' default for these
            out.setdefault("rms_norm_eps", 1e-6)
            out.setdefault("bos_token_id", None)
            out.setdefault("eos_token_id", None)
        if not d.get("num_experts") and model_type != "minimind":
            out.pop("num_experts", None)
        return cls(**out)

    def to_hf_dict(self) -> dict:
        """Returns a config.json dict that transformers (MiniMind for ``minimind``) reads back.

        MoE settings are written under the names of ``minimind_generation``'s MiniMindConfig.
        """
        moe_keys = ("use_moe", "num_experts", "num_experts_per_tok", "n_shared_experts",
                    "norm_topk_prob", "router_aux_loss_coef", "seq_aux", "qk_norm",
                    "minimind_generation", "moe_intermediate_size", "rope_scaling")
        d = {k: v for k, v in self.to_dict().items() if k not in moe_keys}
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "minimind": "MiniMindForCausalLM"}[self.model_type]
        d.update(architectures=[arch], hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        if self.rope_scaling is not None:
            # as MiniMind's config.json under transformers 5 (4.x read the same keys)
            d.update(inference_rope_scaling=True, rope_parameters={
                **self.rope_scaling, "type": "yarn", "rope_type": "yarn",
                "rope_theta": self.rope_theta})
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        if self.qk_norm != (self.model_type == "qwen3"):
            d["qk_norm"] = self.qk_norm  # qwen3 implies it; anything else says so
        if self.model_type == "minimind" or self.use_moe:
            d.update(use_moe=self.use_moe, num_experts_per_tok=self.num_experts_per_tok,
                     norm_topk_prob=self.norm_topk_prob)
            if self.minimind_generation == "minimind3":
                d.update(num_experts=self.num_experts,
                         router_aux_loss_coef=self.router_aux_loss_coef,
                         moe_intermediate_size=self.moe_intermediate_size)
            else:
                d.update(n_routed_experts=self.num_experts, n_shared_experts=self.n_shared_experts,
                         aux_loss_alpha=self.router_aux_loss_coef, seq_aux=self.seq_aux,
                         scoring_func="softmax")
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Reads a config.json (minilora's, transformers' or MiniMind's).

        Raises:
            ValueError: when the file is not valid JSON or holds an unsupported setting.
        """
        path = Path(path)
        d = read_json(path, "a model config.json")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a JSON {_json_type(d)}; expected a JSON object")
        for key in ("rope_scaling", "rope_parameters"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{path}: field '{key}': a JSON {_json_type(d[key])}, "
                                  "expected an object such as {\"rope_type\": \"default\"}")
        try:
            return cls.from_hf_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from e

    def save_json(self, path: str | Path) -> None:
        """Writes config.json in the Hugging Face layout (``from_json`` reads it back)."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


def _generation_from_keys(d: dict, model_type: str) -> str | None:
    """The MiniMind generation a config.json's keys say, or None where they say neither."""
    found = {g: [k for k in keys if k in d] for g, keys in _GENERATION_KEYS.items()}
    if found["minimind2"] and found["minimind3"]:
        raise ConfigError(
            f"config has keys of both MiniMind generations: {found['minimind2']} (MiniMind2) and "
            f"{found['minimind3']} (current MiniMind); keep one generation's names")
    generation = next((g for g in GENERATIONS if found[g]), None)
    explicit = d.get("minimind_generation")
    if explicit is not None:
        if explicit not in GENERATIONS or generation not in (None, explicit):
            raise ConfigError(f"minimind_generation: {explicit!r} does not fit the config's keys "
                              f"(expected one of {GENERATIONS} matching {found})")
        generation = explicit
    if generation is None and model_type == "minimind":
        # MiniMind2 and current MiniMind default these differently: without them, refuse
        unknown = [k for k in ("hidden_size", "num_key_value_heads", "intermediate_size",
                               "rms_norm_eps") if d.get(k) is None]
        if d.get("use_moe"):
            unknown.append("the MoE generation (n_routed_experts: MiniMind2, num_experts: "
                           "current MiniMind)")
        if unknown:
            old, new = (", ".join(_GENERATION_KEYS[g]) for g in GENERATIONS)
            raise ConfigError(
                f"a minimind config without MiniMind2 keys ({old}) or current MiniMind keys "
                f"({new}) does not tell {', '.join(unknown)}; write them, or the generation's keys")
    return generation


def _read_rope(d: dict, model_type: str, out: dict) -> None:
    """rope_theta and MiniMind's YaRN from a config.json into out; other scalings refused."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters: expected an object, got {type(rope).__name__}")
    # transformers 5 keeps rope_theta under rope_parameters; 4.x at the top level, with
    # rope_scaling beside it.
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = float(theta)
    elif model_type != "minimind":
        out["rope_theta"] = 10000.0  # transformers' default for llama/qwen2/qwen3
    yarn = {k: rope.get(k, v) for k, v in YARN_DEFAULTS.items()} if rope_type == "yarn" else None
    if model_type == "minimind" and "inference_rope_scaling" in d:
        # MiniMindConfig builds rope_scaling from this flag alone, with its fixed values
        if not d["inference_rope_scaling"]:
            return
        differ = [f"{k} {yarn[k]} (MiniMind uses {v})" for k, v in YARN_DEFAULTS.items()
                  if yarn is not None and yarn[k] != v]
        if differ or rope_type not in ("default", "yarn"):
            raise ConfigError(
                f"inference_rope_scaling: MiniMind then computes YaRN with {YARN_DEFAULTS}, but "
                f"the file says {', '.join(differ) or 'rope_type ' + repr(rope_type)}; drop "
                f"inference_rope_scaling to use the file's rope_parameters")
        out["rope_scaling"] = dict(YARN_DEFAULTS)
        return
    if rope_type == "default":
        return
    if rope_type == "yarn" and model_type == "minimind":
        out["rope_scaling"] = yarn
        return
    raise ConfigError(f"rope_parameters.rope_type: only 'default' is implemented (and MiniMind's "
                      f"'yarn' for model_type minimind), got {rope_type!r}")


def _check_yarn(scaling: dict | None, model_type: str) -> dict | None:
    """MiniMind's YaRN settings checked and completed with its defaults."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling: expected a dict or None, got {type(scaling).__name__}")
    if model_type != "minimind":
        raise ConfigError(f"rope_scaling: MiniMind's YaRN needs model_type 'minimind' "
                          f"(transformers' YaRN for {model_type} is not implemented)")
    unknown = sorted(set(scaling) - set(YARN_DEFAULTS) - {"type", "rope_type"})
    kind = scaling.get("rope_type", scaling.get("type", "yarn"))
    if unknown or kind != "yarn":
        raise ConfigError(f"rope_scaling: expected MiniMind's YaRN keys {sorted(YARN_DEFAULTS)}, "
                          f"got {sorted(scaling)} (type {kind!r})")
    out = {k: scaling.get(k, v) for k, v in YARN_DEFAULTS.items()}
    bad = [k for k, v in out.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v <= 0]
    if bad:
        raise ConfigError(f"rope_scaling: {', '.join(bad)} must be positive numbers, got "
                          f"{ {k: out[k] for k in bad} }")
    return out
def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


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
            low = _autocast_dtype(x.device.type)
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

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None,
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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on device_type when autocast is on there, else None."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4: no fast path
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        C, D = config.hidden_size, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        # Qwen2 puts biases on q/k/v only; Llama and Qwen3's attention_bias covers o too.
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=bias and config.model_type != "qwen2")
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer: int, start: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, KV, T, D)
        v = v.transpose(1, 2)  # (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, KV, S, D), S = start + T
        low = _autocast_dtype(x.device.type)
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


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        C, F_ = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=False)
        self.up_proj = nn.Linear(C, F_, bias=False)
        self.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., C)


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
        self.shared_experts = nn.ModuleList(MLP(config) for _ in range(config.n_shared_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        topk_idx, topk_weight, aux = self.gate(x)  # (N, K), (N, K), ()
        flat = x.reshape(-1, C)  # (N, C)
        y = torch.zeros_like(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(topk_idx == e)  # (n_e,), (n_e,)
            if token.numel() == 0:
                if self.training:
                    # keep every expert in the graph so DDP sees a gradient for each (as MiniMind)
                    y = y + 0 * sum(p.sum() for p in expert.parameters())
                continue
            out = expert(flat[token]) * topk_weight[token, slot, None].to(x.dtype)  # (n_e, C)
            y = y.index_add(0, token, out)
        y = y.view(B, T, C)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux


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
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)


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
            ValueError: on mismatched shapes, or when logits_to_keep is used with labels.
        """
        B, T = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.config, B, T, device=input_ids.device,
                            dtype=self.model.embed_tokens.weight.dtype)
        start = cache.length if cache is not None else 0
        if labels is not None and labels.shape != input_ids.shape:
            raise ConfigError(f"labels shape {tuple(labels.shape)} != input_ids {(B, T)}")
        if labels is not None and logits_to_keep:
            raise ConfigError("logits_to_keep needs labels=None (the loss reads every position)")
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if segment_ids is not None:
            if cache is not None or position_ids is not None or segment_ids.shape != (B, T):
                raise ConfigError(f"segment_ids must be (batch, tokens) = {(B, T)} and come "
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
        if cache is not None:
            cache.length = start + T
        if labels is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]  # (B, k, C)
            logits = self.lm_head(self.model.norm(x))  # (B, T, V)
            return CausalLMOutput(logits, None, aux_loss, cache)
        # The head and the loss only where a label counts: position t predicts labels[t + 1].
        targets = labels[:, 1:]  # (B, T-1)
        counted = targets != -100  # (B, T-1)
        if torch.compiler.is_compiling():
            # Every position through the head, -100 ignored: the counted gather's size depends on
            # the data, which a compiled step would recompile for (see minilora/compiled.py).
            logits = self.lm_head(self.model.norm(x[:, :-1])).float()  # (B, T-1, V)
            total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        elif type(self.lm_head) is nn.Linear:  # the head + loss in chunks: no (N, V) logits
            h = self.model.norm(x[:, :-1][counted])  # (N, C), N counted positions
            total = linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias,
                                         targets[counted])
        else:  # a wrapped head (LoRA on lm_head, a quantized one) computes its own logits
            h = self.model.norm(x[:, :-1][counted])  # (N, C), N counted positions
            total = F.cross_entropy(self.lm_head(h).float(), targets[counted], reduction="sum")
        loss = total / counted.sum().clamp(min=1)  # 0 when nothing is counted
        return CausalLMOutput(None, loss, aux_loss, cache,
                              lambda: self.lm_head(self.model.norm(x)))

    @staticmethod
    def _attention_mask(attention_mask: Tensor | None, B: int, T: int, start: int,
                        device: torch.device) -> Tensor | None:
        """Boolean (B, 1, T, S) mask, True where a query may attend, or None for the fast paths."""
        S = start + T
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)}: expected "
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


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labels that are not -100; 0 when there are none.

    Args:
        logits: (B, T, V) logits, position t predicting token t + 1.
        labels: (B, T) aligned with the input ids (shifted here).

    Returns:
        A 0-dim float32 tensor.
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    total = F.cross_entropy(pred, targets, ignore_index=-100, reduction="sum")
    count = (targets != -100).sum().clamp(min=1)
    return total / count


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer in preallocated (B, KV, capacity, D) buffers.

    ``length`` is how many positions are filled; the model advances it after each forward.
    A write past ``capacity`` doubles the buffers (generate sizes them once, up front).
    """

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, config.num_key_value_heads, max(capacity, 1), config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.num_hidden_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, KV, T, D) at positions start.. and returns all keys/values so far."""
        end = start + k.shape[2]
        if end > self.capacity:
            new = max(end, 2 * self.capacity)
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    grown = old.new_empty(*old.shape[:2], new, old.shape[3])
                    grown[:, :, : self.length] = old[:, :, : self.length]
                    buffers[i] = grown
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, KV, S, D)


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def generate(model: CausalLM, input_ids: Sequence[int] | Tensor, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             stop: Sequence[Sequence[int]] | None = None, seed: int | None = None) -> list[int]:
    """Continues one sequence; returns the new tokens (arguments as in ``stream_generate``)."""
    return list(stream_generate(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, stop=stop,
        seed=seed))


@torch.inference_mode()
def stream_generate(model: CausalLM, input_ids: Sequence[int] | Tensor, *,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, repetition_penalty: float = 1.0,
                    eos_token_id: int | Sequence[int] | None = None,
                    stop: Sequence[Sequence[int]] | None = None,
                    seed: int | None = None) -> Iterator[int]:
    """Continues one sequence with a KV cache, yielding each new token as soon as it is final.

    Args:
        model: the model (its mode is left as it is).
        input_ids: the prompt, a list of ids or a (T,) / (1, T) tensor.
        max_new_tokens: most tokens to produce.
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / t).
        top_k: sample among the k most likely tokens only (0 = all).
        top_p: sample among the smallest set of tokens whose probability reaches top_p (1 = all).
        repetition_penalty: transformers' rule: a logit of a token already in the prompt or output
            is divided by it (multiplied when negative); 1 = off.
        eos_token_id: id(s) that end generation; not yielded. None: generation never stops early.
        stop: token id sequences that end generation; not yielded. Tokens that could begin one
            are held back until they cannot.
        seed: seeds the sampling generator, so the same call gives the same tokens.

    Yields:
        New token ids.

    Raises:
        ValueError: on an empty prompt or an out-of-range argument (naming it).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    stops = [list(s) for s in stop or []]
    if any(not s for s in stops):
        raise ConfigError("stop: every stop sequence needs at least one token")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    weight = model.model.embed_tokens.weight
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=weight.device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ConfigError("input_ids: the prompt is empty")
    _check_ids(ids, weight.shape[0])
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)  # (V,)
        seen[ids[0]] = True

    cache = KVCache(model.config, 1, ids.shape[1] + max_new_tokens, device=weight.device,
                    dtype=weight.dtype)
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]  # (V,)
    pending: list[int] = []  # tokens that may begin a stop sequence
    for step in range(max_new_tokens):
        token = _pick(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
        t = int(token)
        if t in eos:
            break
        if not stops:
            yield t
        else:
            pending.append(t)
            if any(pending[-len(s):] == s for s in stops if len(s) <= len(pending)):
                # a stop sequence ends here; what came before it is final
                done = max(len(s) for s in stops
                           if len(s) <= len(pending) and pending[-len(s):] == s)
                yield from pending[:-done]
                pending = []
                break
            keep = _held_back(pending, stops)
            yield from pending[: len(pending) - keep]
            pending = pending[len(pending) - keep:]
        if step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[token] = True
        logits = model(token.view(1, 1), past_key_values=cache, logits_to_keep=1).logits[0, -1]
    yield from pending


@torch.inference_mode()
def generate_batch(model: CausalLM, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, repetition_penalty: float = 1.0,
                   eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                   **forward_kwargs: object) -> list[list[int]]:
    """Continues several prompts in one batch; returns each one's new tokens.

    Prompts are left-padded and the padding masked. Rotary attention depends only on the
    distance between positions, so each row gets the tokens ``generate`` gives it alone (greedy,
    up to float rounding; sampling draws from one generator for the whole batch).

    Args:
        model: the model.
        prompts: one list of token ids per row.
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id, seed: as in
            ``stream_generate``; a row that meets an eos token stops growing.
        **forward_kwargs: passed to every forward, e.g. ``adapter_names=[...]`` (one LoRA adapter
            per row, see minilora.lora.mixed_adapters).

    Returns:
        The new tokens of each row (eos not included).

    Raises:
        ValueError: on an empty prompt list or prompt, or an out-of-range argument.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: expected a non-empty list of non-empty prompts")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    weight = model.model.embed_tokens.weight
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=weight.device)  # (B, L), left-padded
    mask = torch.zeros(B, L + max_new_tokens, dtype=torch.long, device=weight.device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):L] = 1
    _check_ids(ids, weight.shape[0])
    generator = None if seed is None else torch.Generator(weight.device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, weight.shape[0], dtype=torch.bool, device=weight.device)  # (B, V)
        for i, p in enumerate(prompts):
            seen[i, list(p)] = True
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    cache = KVCache(model.config, B, L + max_new_tokens, device=weight.device, dtype=weight.dtype)
    logits = model(ids, attention_mask=mask[:, :L], past_key_values=cache, logits_to_keep=1,
                   **forward_kwargs).logits[:, -1]  # (B, V)
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = torch.stack([
            _pick(logits[i], None if seen is None else seen[i], temperature, top_k, top_p,
                  repetition_penalty, generator) for i in range(B)])  # (B,)
        for i, t in enumerate(tokens.tolist()):
            done[i] = done[i] or t in eos
            if not done[i]:
                out[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B), tokens] = True
        mask[:, L + step] = 1
        logits = model(tokens.view(B, 1), attention_mask=mask[:, :L + step + 1],
                       past_key_values=cache, logits_to_keep=1,
                       **forward_kwargs).logits[:, -1]  # (B, V)
    return out


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    repetition_penalty: float, seed: int | None) -> None:
    """Every sampling setting finite and in range (NaN passes every comparison)."""
    number("temperature", temperature, low=0)
    number("top_p", top_p, low=0, low_open=True, high=1)
    number("repetition_penalty", repetition_penalty, low=0, low_open=True)
    for name, value in (("top_k", top_k), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        raise ConfigError(f"seed: expected an integer in [0, 2**63), got {seed!r}")


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    """Token ids the embedding has rows for (a tokenizer larger than the model has others)."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"the prompt holds token ids outside the model's vocabulary (0 .. "
                          f"{vocab_size - 1}, found {low} .. {high}); the tokenizer does not "
                          "belong to this model")


def _held_back(pending: list[int], stops: list[list[int]]) -> int:
    """Length of the longest suffix of pending that is a proper prefix of a stop sequence."""
    for n in range(min(len(pending), max(len(s) for s in stops) - 1), 0, -1):
        if any(s[:n] == pending[-n:] for s in stops if len(s) > n):
            return n
    return 0


def _pick(logits: Tensor, seen: Tensor | None, temperature: float, top_k: int, top_p: float,
          repetition_penalty: float, generator: torch.Generator | None) -> Tensor:
    """The next token (a 0-dim tensor) from (V,) logits, with transformers' processor order."""
    if seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty,
                                logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)  # (V,)
    if temperature == 0:
        return logits.argmax()
    logits = logits.float() / temperature  # (V,)
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # (V,)
        drop[-1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)  # (V,)
    return torch.multinomial(probs, 1, generator=generator)[0]
