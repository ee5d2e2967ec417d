"""ModelConfig: the decoder's hyper-parameters, and transformers' / MiniMind's config.json.

``from_hf_dict`` / ``to_hf_dict`` map the config.json of transformers' llama, qwen2 and qwen3 and of
both MiniMind generations (MiniMind2's MoE names and the current ones, MiniMind's YaRN) onto one
dataclass under Hugging Face names; settings the decoder does not implement are refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from minilora.core.checks import type_problems
from minilora.core.errors import ConfigError
from minilora.core.files import atomic_write, json_type, read_json

MODEL_TYPES = ("llama", "qwen2", "qwen3", "minimind")
# MiniMind's two generations of model file: "minimind2" (shared experts, n_routed_experts,
# aux_loss_alpha, seq_aux) and "minimind3" (its current one: q/k norm, top-1 routing renormalised,
# router_aux_loss_coef, eps 1e-6). Each one's MiniMindConfig defaults, for keys a file leaves out.
GENERATIONS = ("minimind2", "minimind3")
MINIMIND_DEFAULTS: dict[str, dict[str, Any]] = {
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


def filled(value: int | None) -> int:
    """A size field that ModelConfig leaves None only until ``__post_init__`` fills it in
    (num_key_value_heads, head_dim, intermediate_size, moe_intermediate_size, n_shared_experts).
    """
    assert value is not None, "ModelConfig.__post_init__ fills this field"
    return value


def default_intermediate_size(hidden_size: int, generation: str) -> int:
    """MiniMind's SwiGLU width rule: int(8/3 h) (MiniMind2) or h * pi (current), rounded up to
    a multiple of 64."""
    if generation == "minimind3":
        return math.ceil(hidden_size * math.pi / 64) * 64
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


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
    # (bare dict: checks.type_problems writes the type into its error, "expected dict or null")
    rope_scaling: dict | None = None  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        problems = type_problems(self, "")  # a float head_dim, a "false" string, a NaN eps ...
        if problems:
            raise ConfigError("; ".join(problems))
        self._fill_defaults()
        # Every problem at once, so a config is fixed in one round; the sizes first, since the
        # checks after them divide by them.
        problems = self._size_problems()
        if not problems:
            problems = self._shape_problems() + (self._moe_problems() if self.use_moe else [])
        if problems:
            raise ConfigError("; ".join(problems))
        self.rope_scaling = _check_yarn(self.rope_scaling, self.model_type)

    def _fill_defaults(self) -> None:
        """The fields left None that follow from others."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = default_intermediate_size(self.hidden_size,
                                                               self.minimind_generation)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.n_shared_experts is None:
            self.n_shared_experts = int(self.minimind_generation == "minimind2")

    def _size_problems(self) -> list[str]:
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.minimind_generation not in GENERATIONS:
            problems.append(f"minimind_generation: expected one of {GENERATIONS}, got "
                            f"{self.minimind_generation!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        return problems

    def _shape_problems(self) -> list[str]:
        problems = []
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given")
            else:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            problems.append(f"head_dim: expected a positive even int (RoPE), got {self.head_dim}")
        if self.num_attention_heads % filled(self.num_key_value_heads):
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rms_norm_eps <= 0:
            problems.append(f"rms_norm_eps: expected > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta: expected > 0, got {self.rope_theta}")
        return problems

    def _moe_problems(self) -> list[str]:
        problems = []
        if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(
                f"num_experts_per_tok: expected 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}")
        if filled(self.n_shared_experts) < 0:
            problems.append(f"n_shared_experts: expected >= 0, got {self.n_shared_experts}")
        if self.router_aux_loss_coef < 0:
            problems.append(
                f"router_aux_loss_coef: expected >= 0, got {self.router_aux_loss_coef}")
        if self.minimind_generation == "minimind3" and self.n_shared_experts:
            problems.append(
                f"n_shared_experts: MiniMind's current MoE (minimind3) has no shared experts, "
                f"got {self.n_shared_experts}; use minimind_generation 'minimind2'")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            problems.append(f"moe_intermediate_size: expected a positive int, got "
                            f"{self.moe_intermediate_size!r}")
        elif (self.minimind_generation == "minimind2"
                and self.moe_intermediate_size != self.intermediate_size):
            problems.append(
                f"moe_intermediate_size: MiniMind2's experts are intermediate_size "
                f"({self.intermediate_size}) wide, got {self.moe_intermediate_size}; use "
                f"minimind_generation 'minimind3'")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from minilora's field names.

        Raises:
            ConfigError: on a key that is not a field (naming it and listing the valid ones).
        """
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown ModelConfig key(s) {unknown}; valid keys: {valid}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
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
        _refuse_unsupported(d, model_type)
        generation = _generation_from_keys(d, model_type)
        out: dict[str, Any] = {"model_type": model_type,
                               "minimind_generation": generation or "minimind2"}
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
        _transformers_defaults(d, model_type, out)
        return cls(**out)

    def to_hf_dict(self) -> dict[str, Any]:
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
            ConfigError: when the file is not valid JSON or holds an unsupported setting.
        """
        path = Path(path)
        d = read_json(path, "a model config.json")
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a JSON {json_type(d)}; expected a JSON object")
        for key in ("rope_scaling", "rope_parameters"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{path}: field '{key}': a JSON {json_type(d[key])}, "
                                  "expected an object such as {\"rope_type\": \"default\"}")
        try:
            return cls.from_hf_dict(d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from e

    def save_json(self, path: str | Path) -> None:
        """Writes config.json in the Hugging Face layout (``from_json`` reads it back)."""
        atomic_write(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")


def _refuse_unsupported(d: dict[str, Any], model_type: str) -> None:
    """Settings of a config.json this decoder does not compute, refused by key."""
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


def _transformers_defaults(d: dict[str, Any], model_type: str, out: dict[str, Any]) -> None:
    """What transformers' config classes imply for keys a llama/qwen2/qwen3 file leaves out."""
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


def _generation_from_keys(d: dict[str, Any], model_type: str) -> str | None:
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


def _read_rope(d: dict[str, Any], model_type: str, out: dict[str, Any]) -> None:
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


def _check_yarn(scaling: dict[str, Any] | None, model_type: str) -> dict[str, Any] | None:
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
