"""A model, or its LoRA adapter alone, as one GGUF file that llama.cpp and Ollama load.

The file is written with the ``gguf`` package (llama.cpp's own gguf-py, the extra ``gguf``);
what goes in it follows llama.cpp's converters:

- architecture: llama (Llama, MiniMind without q/k norm), qwen2, qwen3 (Qwen3, MiniMind with
  q/k norm); an MoE or YaRN model has no exact llama.cpp form and is refused;
- tensors under llama.cpp's names (gguf's own name map); for the llama architecture the rows of
  q_proj / k_proj are reordered per head, since llama.cpp's llama rotary pairs neighbouring
  dimensions where Hugging Face's pairs each dimension with the one half a head away;
- the tokenizer (byte-level BPE: tokens, merges, the pre-tokenizer's llama.cpp name, bos / eos /
  end of turn) and the chat template, so the model stops where it should. A pre-tokenizer
  llama.cpp would split differently is refused: the tokenizer is run with the pre-tokenizer
  llama.cpp applies for that name on a probe corpus, and any difference refuses the export;
- an adapter file (``general.type=adapter``): ``<tensor>.lora_a`` (r, in) and ``.lora_b``
  (out, r), with ``adapter.lora.alpha`` chosen so that llama.cpp's ``alpha / r`` is minilora's
  scaling (rsLoRA's ``alpha / sqrt(r)`` included).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minilora.core.errors import ExportError, MiniloraError, MissingExtra, OutputError
from minilora.core.files import atomic_path
from minilora.data.tokenizer import CHAT_TEMPLATE, Tokenizer
from minilora.lora.embedding import LoRAEmbedding
from minilora.lora.layer import LoRALayer, lora_modules
from minilora.lora.named import adapter_layers, resolve_adapter
from minilora.lora.quantized_weight import is_quantized, quant_kind
from minilora.model.config import ModelConfig, filled

DTYPES = ("f32", "f16", "bf16", "q8_0")
# Rows of a q8_0 block: a weight whose rows are not a multiple of it is written f16 instead
# (llama.cpp's converter does the same).
_Q8_0_BLOCK = 32

# The pre-tokenizers llama.cpp knows by name, as a tokenizer.json writes them: GPT-2's byte-level
# regex, and a Split by a regex before a regex-free byte-level step (Qwen2, Llama 3).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}
PRE_TOKENIZERS = ("gpt-2", *_SPLIT_NAMES.values())

# Text the tokenizer must split as llama.cpp does: contractions, digits, whitespace runs, tabs
# and newlines, accents, CJK, emoji, punctuation; the chat template's text is added to it.
PROBE_TEXTS = (
    "Hello world", " Hello  world ", "I'll say it's 12345, or 3.14159!", "don't WON'T they're",
    "  leading and trailing spaces  ", "tabs\tand\n\nnewlines\r\n", "\n\n\n", "   ",
    "    def f(x):\n        return x  # four spaces\n", "héllo wörld, naïve café",
    "中文字符和日本語のテキスト", "emoji 🙂👍🏽 and symbols ∑∫√ ½ ³", "UPPER lower MiXeD",
    "a\u00a0b\u2003c", "'quoted' \"double\" `back`", "1,000,000 and 2024-01-31",
)


@dataclass
class GGUFExport:
    """What ``export_gguf`` wrote.

    Attributes:
        path: the GGUF file.
        architecture: llama.cpp's architecture name (``llama``, ``qwen2``, ``qwen3``).
        dtype: the weights' type (``f32``, ``f16``, ``bf16``, ``q8_0``).
        tensors: how many tensors the file holds.
        adapter_only: a LoRA adapter file (True) or a whole model.
        pre_tokenizer: the pre-tokenizer's llama.cpp name (None for an adapter file).
        alpha: ``adapter.lora.alpha`` of an adapter file (None for a model).
    """

    path: Path
    architecture: str
    dtype: str
    tensors: int
    adapter_only: bool
    pre_tokenizer: str | None = None
    alpha: float | None = None

    def __str__(self) -> str:
        kind = "LoRA adapter" if self.adapter_only else "model"
        size = self.path.stat().st_size / 2**20
        return (f"{self.path}: GGUF {kind}, architecture {self.architecture}, {self.dtype}, "
                f"{self.tensors} tensors, {size:.1f} MiB")


def require_gguf() -> Any:
    """Imports the ``gguf`` package.

    Raises:
        MissingExtra: it is not installed (the message names the ``gguf`` extra).
    """
    try:
        import gguf
    except ImportError:
        raise MissingExtra("GGUF export", "gguf") from None
    return gguf


def export_gguf(
    model: nn.Module,
    tokenizer: Tokenizer | None,
    path: str | os.PathLike[str],
    *,
    dtype: str = "f16",
    adapter_only: bool = False,
    adapter: str | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> GGUFExport:
    """Writes ``model`` (its active adapters merged in) or one adapter alone as a GGUF file.

    Everything is checked before anything is written; the file is written whole (a temporary
    file renamed over ``path``) while a lock on its folder keeps a second export out.

    Args:
        model: a minilora ``CausalLM``, with LoRA adapters or without.
        tokenizer: the model's tokenizer (written into a model file; unused for an adapter).
        path: the ``.gguf`` file to write.
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (norms and biases stay f32, as llama.cpp
            writes them).
        adapter_only: write the adapter alone (llama.cpp's LoRA adapter format), to apply over
            a GGUF of the base.
        adapter: which adapter (default: the only one, or the only active one).
        overwrite: replace an existing ``path``.
        name: ``general.name`` (default: the file's stem).

    Returns:
        What was written.

    Raises:
        ExportError: an architecture, a tokenizer or an adapter llama.cpp cannot hold exactly
            (MoE, YaRN, a pre-tokenizer it would split differently, DoRA ...), a quantized base
            or a non-finite weight.
        OutputError: ``path`` exists (without ``overwrite``), is a folder, or another export
            is writing into its folder.
        MissingExtra: the ``gguf`` package is not installed.
    """
    gguf = require_gguf()
    path = Path(path)
    if dtype not in DTYPES:
        raise ExportError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_output(path, overwrite)
    config = _model_config(model)
    arch = architecture(config)
    _refuse_quantized(model)
    alpha = None
    if adapter_only:
        tensors, alpha = adapter_tensors(model, config, arch, adapter)
    else:
        tensors = model_tensors(model, config, arch)
    _check_finite(tensors)
    vocab = None if adapter_only or tokenizer is None else tokenizer_metadata(tokenizer, config)
    if not adapter_only and vocab is None:
        raise ExportError("a GGUF model needs its tokenizer: pass the model's Tokenizer")

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or path.stem)
    if adapter_only:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    else:
        assert vocab is not None  # refused above
        writer.add_type(gguf.GGUFType.MODEL)
        _add_hyperparameters(writer, config, arch)
        _add_tokenizer(writer, vocab)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, array in tensors.items():
        data, raw = encode(array, dtype, gguf)
        _check_fits(tensor_name, array, data, raw, dtype, gguf)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)

    with _folder_lock(path.parent), atomic_path(path) as tmp:
        _check_output(path, overwrite)  # again, now that no other export can write here
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFExport(path, arch, dtype, len(tensors), adapter_only,
                      None if vocab is None else vocab["pre"], alpha)


# ------------------------------------------------------------------------------------------------
# Architecture and tensors
# ------------------------------------------------------------------------------------------------


def _model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ExportError(f"GGUF export takes a minilora CausalLM (load_model), got "
                          f"{type(model).__name__}")
    return config


def architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for a model config.

    Raises:
        ExportError: an MoE or YaRN model, or a combination llama.cpp has no architecture for.
    """
    what = config.model_type
    if config.use_moe:
        raise ExportError(f"this {what} model is a mixture of experts, which llama.cpp's "
                          "llama / qwen2 / qwen3 architectures do not compute; only dense "
                          "models are exported to GGUF")
    if config.rope_scaling is not None:
        raise ExportError(f"this {what} model uses MiniMind's YaRN rope scaling, which llama.cpp "
                          "does not compute the same way; export the model without "
                          "inference_rope_scaling (its config.json) to get it exactly")
    if config.model_type == "qwen2":
        if config.qk_norm or not config.attention_bias:
            raise ExportError("a qwen2 model with q/k norm or without q/k/v biases has no "
                              "llama.cpp architecture")
        return "qwen2"
    if config.qk_norm:  # qwen3, or MiniMind's current generation
        if config.attention_bias:
            raise ExportError(f"a {what} model with q/k norm and attention biases has no "
                              "llama.cpp architecture (qwen3 has no biases)")
        return "qwen3"
    return "llama"  # llama, or MiniMind2 / MiniMind without q/k norm: the same computation


def _refuse_quantized(model: nn.Module) -> None:
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_quantized(weight):
            raise ExportError(
                f"the base is {quant_kind(weight)}-quantized ({path}): GGUF holds the merged "
                "weights, and an update merged into rounded weights is not the model that was "
                "trained; export from the full-precision base instead (load it without "
                "quantizing: minilora export --model BASE --adapter DIR)")


def _gguf_name(names: Any, key: str) -> str:
    found = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"tensor {key} has no llama.cpp name in this architecture")
    return found


def model_tensors(model: nn.Module, config: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, float32, the active adapters merged in
    (the model itself is left unchanged).

    The output head is written only where it is not the embedding (untied, or tied with an
    adapter on it or on the embedding: the file then holds both).
    """
    gguf = require_gguf()
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch), config.num_hidden_layers)
    lora = dict(lora_modules(model))
    inside = tuple(f"{p}.lora_" for p in lora)
    # LoRA on the embedding changes the lookup only: a tied head then needs its own (base) tensor
    lookup_only = any(isinstance(m, LoRAEmbedding) and _adds(m) for m in lora.values())
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith(inside):
            continue
        path = key.rsplit(".", 1)[0]
        module = lora.get(path)
        adapted = module is not None and key == f"{path}.weight" and _adds(module)
        with torch.no_grad():
            tensor = value.detach().float()
            if adapted and module is not None and not module.merged:
                tensor = tensor + module.delta_weight()
            elif module is not None and module.merged and not module.enabled:
                raise ExportError(f"{path}: its adapters are merged into the weight but "
                                  "disabled; unmerge them (unmerge_lora) before exporting")
        if key == "lm_head.weight" and config.tie_word_embeddings and not adapted and not (
                lookup_only):
            continue  # llama.cpp reads the embedding as the head when there is no output tensor
        out[_gguf_name(names, key)] = _for_gguf(key, tensor, config, arch).numpy()
    return out


def _adds(m: LoRALayer) -> bool:
    """Whether the layer's forward adds an adapter's update to its weight (as its forward
    decides: adapters active and the layer enabled)."""
    return m.enabled and bool(m.active_adapters)


def adapter_tensors(model: nn.Module, config: ModelConfig, arch: str, adapter: str | None
                    ) -> tuple[dict[str, np.ndarray], float]:
    """One adapter's ``<tensor>.lora_a`` (r, in) and ``.lora_b`` (out, r), float32, and the
    ``adapter.lora.alpha`` that makes llama.cpp's scale (alpha / r) minilora's.

    Layers whose scaling times r differ from the first one's (another rank or alpha) get the
    ratio folded into their B, so one alpha serves every layer.

    Raises:
        ExportError: no adapter, DoRA, a PiSSA adapter saved as a residual, LoRA on the
            embedding, or an adapter on a tied output head (the base GGUF has no output tensor
            to apply it to).
    """
    gguf = require_gguf()
    if not lora_modules(model):
        raise ExportError("--adapter-only needs an adapter: the model has none (give --adapter)")
    try:
        name = resolve_adapter(model, adapter, "export")
    except MiniloraError as err:
        raise ExportError(str(err)) from None
    layers = adapter_layers(model, name)
    names = gguf.get_tensor_name_map(_arch_enum(gguf, arch), config.num_hidden_layers)
    first = layers[0][1]
    alpha = float(first.scaling[name] * first.r[name])
    out: dict[str, np.ndarray] = {}
    for path, m in layers:
        _check_plain_lora(path, m, name, config)
        with torch.no_grad():
            a = m.lora_A[name].weight.detach().float()  # (r, in)
            b = m.lora_B[name].weight.detach().float()  # (out, r)
            ratio = m.scaling[name] * m.r[name] / alpha
            if ratio != 1.0:
                b = b * ratio
        key = f"{path}.weight"
        base = _gguf_name(names, key)
        out[f"{base}.lora_a"] = a.numpy()
        out[f"{base}.lora_b"] = _for_gguf(key, b, config, arch).numpy()
    return out, alpha


def _check_plain_lora(path: str, m: LoRALayer, name: str, config: ModelConfig) -> None:
    if isinstance(m, LoRAEmbedding):
        raise ExportError(f"adapter {name!r} has LoRA on the embedding ({path}), which minilora "
                          "does not write as a llama.cpp adapter; export the merged model "
                          "instead (without --adapter-only)")
    if name in m.lora_magnitude_vector:
        raise ExportError(f"adapter {name!r} is DoRA ({path}), which llama.cpp's LoRA adapters "
                          "cannot hold; export the merged model instead (without --adapter-only)")
    if m.init.get(name) == "pissa":
        raise ExportError(f"adapter {name!r} is PiSSA saved against its residual base ({path}); "
                          "llama.cpp applies adapters to the original base: export the merged "
                          "model, or save the adapter with its initial state (pissa_initial) "
                          "to get the plain LoRA it equals")
    if path == "lm_head" and config.tie_word_embeddings:
        raise ExportError("the adapter changes the output head, which this model ties to the "
                          "embedding: a GGUF base has no output tensor to apply it to; export "
                          "the merged model instead (without --adapter-only)")


def _for_gguf(key: str, tensor: torch.Tensor, config: ModelConfig, arch: str) -> torch.Tensor:
    """The tensor as llama.cpp's architecture reads it: q/k rows interleaved for llama."""
    if arch != "llama":
        return tensor.contiguous()
    if ".self_attn.q_proj." in key:
        return rope_rows_interleaved(tensor, config.num_attention_heads)
    if ".self_attn.k_proj." in key:
        return rope_rows_interleaved(tensor, filled(config.num_key_value_heads))
    return tensor.contiguous()


def rope_rows_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the output rows of q_proj / k_proj (weight, bias or LoRA B) for llama.cpp's llama
    rotary embedding.

    Hugging Face rotates dimension i of a head with dimension i + d/2; llama.cpp's llama rotates
    dimension 2i with 2i + 1. Within each head, rows (i, i + d/2) become rows (2i, 2i + 1).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _check_finite(tensors: dict[str, np.ndarray]) -> None:
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ExportError(f"inf or NaN in {shown} (after merging the adapter): the weights or "
                          "the adapter are broken; nothing was written")


def _check_fits(name: str, array: np.ndarray, data: np.ndarray, raw: Any, dtype: str,
                gguf: Any) -> None:
    """What the file will hold is finite: a weight beyond f16's range (f16, and q8_0's f16 block
    scales) would be read back as inf."""
    decoded = data if raw is None else gguf.quants.dequantize(data, raw)
    if not np.isfinite(decoded).all():
        peak = float(np.abs(array).max())
        raise ExportError(f"{name} does not fit {dtype} (values up to {peak:.3g}) and would be "
                          "written as inf; nothing was written: choose --dtype bf16 or f32")


def encode(array: np.ndarray, dtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """The array in the file's dtype and its GGML type (None: numpy's own type says it).

    1-D tensors (norms, biases) stay f32; a q8_0 weight whose rows are not whole blocks is
    written f16.
    """
    q = gguf.GGMLQuantizationType
    if dtype == "f32" or array.ndim == 1:
        return array.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and array.shape[-1] % _Q8_0_BLOCK):
        with np.errstate(over="ignore"):  # beyond f16's range: inf, refused by _check_fits
            return array.astype(np.float16), None
    kind = q.BF16 if dtype == "bf16" else q.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), kind), kind


# llama.cpp's general.file_type for each dtype (its LlamaFileType member)
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _arch_enum(gguf: Any, arch: str) -> Any:
    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]


def _add_hyperparameters(writer: Any, config: ModelConfig, arch: str) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def pre_tokenizer_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer.

    Raises:
        ExportError: one llama.cpp has no name for (it would split text differently).
    """
    pre = data.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (kind == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_NAMES:
            return _SPLIT_NAMES[regex]
    shown = json.dumps(pre)[:120]
    raise ExportError(f"the tokenizer's pre-tokenizer ({shown}) is none that llama.cpp knows by "
                      f"name ({', '.join(PRE_TOKENIZERS)}), so llama.cpp would split text "
                      "differently and the model would read other tokens; it is not exported")


def llama_cpp_pre_tokenizer(name: str) -> dict[str, Any]:
    """The pre-tokenizer llama.cpp applies for ``name``, in tokenizer.json's terms."""
    if name == "gpt-2":
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": True}
    regex = next(r for r, n in _SPLIT_NAMES.items() if n == name)
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
         "use_regex": False}]}


def probe_corpus(tokenizer: Tokenizer) -> list[str]:
    """PROBE_TEXTS plus a chat rendered with the tokenizer's template (its special tokens)."""
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there!  How's it going?\n"},
            {"role": "assistant", "content": "Fine, thanks. 42 ✓"}]
    texts = list(PROBE_TEXTS)
    try:
        texts.append(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    except MiniloraError:  # a template that refuses a system turn
        texts.append(tokenizer.apply_chat_template(chat[1:], add_generation_prompt=True))
    return texts


def check_splits_as_llama_cpp(tokenizer: Tokenizer, data: dict[str, Any], name: str) -> None:
    """Tokenizes the probe corpus with the tokenizer as it is and with the pre-tokenizer llama.cpp
    applies for ``name`` (no normalizer, no prefix space); any difference refuses.

    Raises:
        ExportError: naming the first probe text tokenized differently.
    """
    from tokenizers import Tokenizer as HFTokenizer

    canonical = dict(data, normalizer=None, pre_tokenizer=llama_cpp_pre_tokenizer(name))
    try:
        theirs = HFTokenizer.from_str(json.dumps(canonical))
    except Exception as err:  # tokenizers raises a bare Exception on what it cannot build
        raise ExportError(f"the tokenizer cannot be rebuilt with llama.cpp's {name} "
                          f"pre-tokenizer ({err}); it is not exported") from None
    for text in probe_corpus(tokenizer):
        if tokenizer.encode(text) != theirs.encode(text, add_special_tokens=False).ids:
            raise ExportError(
                f"the tokenizer splits {text[:40]!r} differently from llama.cpp's {name} "
                "pre-tokenizer (a normalizer, a prefix space or another split step), so the "
                "GGUF model would read other tokens; it is not exported")


def tokenizer_metadata(tokenizer: Tokenizer, config: ModelConfig) -> dict[str, Any]:
    """What the GGUF file says of the tokenizer: tokens, types, merges, pre-tokenizer name,
    special ids and chat template.

    Raises:
        ExportError: not a byte-level BPE llama.cpp splits the same way, or more ids than the
            model's embedding has rows.
    """
    data = json.loads(tokenizer.to_json())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"the tokenizer is a {model.get('type')} model"
                          f"{' with byte fallback' if model.get('byte_fallback') else ''}; GGUF "
                          "export writes byte-level BPE tokenizers (GPT-2 style) only")
    pre = pre_tokenizer_name(data)
    if model.get("ignore_merges") and pre != "llama-bpe":
        raise ExportError("the tokenizer ignores merges for whole-word tokens, which llama.cpp "
                          f"does only for its llama-bpe pre-tokenizer, not {pre}")
    check_splits_as_llama_cpp(tokenizer, data, pre)

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = 3 if added.get("special") else 4  # CONTROL, USER_DEFINED
    if max(by_id) >= config.vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding "
                          f"has {config.vocab_size} rows; pass the model's own tokenizer")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    types = [kinds.get(i, 1 if i in by_id else 5) for i in range(config.vocab_size)]  # 5 UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    stops = tokenizer.stop_token_ids
    eos = tokenizer.eos_token_id
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": eos, "pad": tokenizer.pad_token_id,
        "eot": next((i for i in stops if i != eos), eos),
        "chat_template": tokenizer.chat_template or CHAT_TEMPLATE,
    }


def _add_tokenizer(writer: Any, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("eot", writer.add_eot_token_id), ("pad", writer.add_pad_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    # minilora never puts bos / eos around text; llama.cpp must not either
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab["chat_template"])


# ------------------------------------------------------------------------------------------------
# The output
# ------------------------------------------------------------------------------------------------


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise OutputError(f"{path} is a folder; the GGUF output is a file (FILE.gguf)")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; nothing is overwritten without --overwrite")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent} does not exist; create the folder first")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One export at a time into a folder: an flock on the folder itself, so no lock file is
    left among the user's files; the system drops it when the process ends."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputError(f"another export is writing into {folder}; wait for it to end, "
                              "or choose another folder") from None
        yield
    finally:
        os.close(fd)

