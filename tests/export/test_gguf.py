"""minilora export to GGUF, read back with gguf-py's own reader (llama.cpp's Python package).

Every key and tensor of the file is compared with what the test computes itself: llama.cpp's
tensor names written out below, the merged weight as W + scaling * B @ A, and the llama rotary
row order undone by an index formula (row h*d + 2j + s of the file is row h*d + s*d/2 + j of
the Hugging Face weight), not by the exporter's reshape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import add_random_adapter, tiny_tokenizer
from minilora.core.errors import ExportError
from minilora.data.tokenizer import Tokenizer
from minilora.export.gguf import export_gguf, llama_cpp_pre_tokenizer
from minilora.lora.config import LoraConfig
from minilora.lora.injection import inject_lora
from minilora.lora.layer import lora_modules
from minilora.model.config import ModelConfig
from minilora.model.decoder import CausalLM

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'minilora[gguf]')")
pytestmark = pytest.mark.usefixtures("one_thread")

# model type -> (ModelConfig changes, llama.cpp architecture)
KINDS = {
    "llama": ({}, "llama"),
    "qwen2": ({"attention_bias": True}, "qwen2"),
    "qwen3": ({"qk_norm": True, "head_dim": 16}, "qwen3"),
    "minimind": ({"minimind_generation": "minimind3", "qk_norm": True}, "qwen3"),
    "minimind2": ({"minimind_generation": "minimind2"}, "llama"),
}
# Hugging Face name (layer N) -> llama.cpp's, as its converters write them.
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
    "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight":
    "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, n, rest = hf.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{n}.{NAMES[rest]}"


def tiny(kind: str, vocab: int, *, seed: int = 0, tied: bool = True) -> CausalLM:
    changes, _ = KINDS[kind]
    torch.manual_seed(seed)
    config = ModelConfig(model_type="minimind" if kind.startswith("minimind") else kind,
                         vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied,
                         rope_theta=10000.0, **changes)
    model = CausalLM(config)
    with torch.no_grad():  # norms and biases away from their init, so a mix-up shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def interleaved_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's llama row order: file row h*d + 2j + s is Hugging Face row h*d + s*d/2 + j."""
    d = w.shape[0] // n_heads
    index = [h * d + s * (d // 2) + j for h in range(n_heads) for j in range(d // 2)
             for s in range(2)]
    return w[index]


@torch.no_grad()
def expected_tensors(model: CausalLM, arch: str) -> dict[str, torch.Tensor]:
    """The merged model under llama.cpp's names, from the definition W + scaling * B @ A."""
    cfg = model.config
    lora = dict(lora_modules(model))
    out = {}
    for key, value in model.state_dict().items():
        path = key.rsplit(".", 1)[0]
        if any(key.startswith(f"{p}.lora_") for p in lora):
            continue
        w = value.float().clone()
        if path in lora and key.endswith(".weight"):
            m = lora[path]
            for name in m.active_adapters:
                w += m.scaling[name] * (m.lora_B[name].weight.float() @ m.lora_A[name].weight
                                        .float())
        if key == "lm_head.weight" and cfg.tie_word_embeddings and path not in lora:
            continue
        if arch == "llama" and "q_proj" in key:
            w = interleaved_rows(w, cfg.num_attention_heads)
        if arch == "llama" and "k_proj" in key:
            w = interleaved_rows(w, cfg.num_key_value_heads)
        out[gguf_name(key)] = w
    return out


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(t) -> np.ndarray:
    """A tensor of the file as float32 in its numpy (rows, columns) shape."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_model_round_trip_every_key_and_tensor(kind: str, tok: Tokenizer,
                                                      tmp_path: Path) -> None:
    model = tiny(kind, tok.vocab_size)
    add_random_adapter(model, "default", seed=1, targets="all-linear")
    arch = KINDS[kind][1]
    report = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    assert report.architecture == arch and report.pre_tokenizer == "gpt-2"

    fields, tensors = read(tmp_path / "m.gguf")
    cfg = model.config
    vocab = json.loads(tok.to_json())
    by_id = {i: t for t, i in vocab["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in vocab["added_tokens"]})
    expected_keys = {
        "general.architecture": arch, "general.type": "model", "general.name": "m",
        "general.file_type": 0, "general.quantization_version": 2,
        f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": 256,
        f"{arch}.embedding_length": 32, f"{arch}.block_count": 2,
        f"{arch}.feed_forward_length": 64, f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2, f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.rope.dimension_count": cfg.head_dim, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(cfg.rms_norm_eps),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": [by_id[i] for i in range(cfg.vocab_size)],
        "tokenizer.ggml.token_type": [3 if by_id[i].startswith("<|") else 1
                                      for i in range(cfg.vocab_size)],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m)
                                  for m in vocab["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": tok.token_to_id("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tok.token_to_id("<|im_end|>"),
        "tokenizer.ggml.eot_token_id": tok.token_to_id("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tok.token_to_id("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tok.chat_template or
        json.loads((Path(__file__).parents[2] / "minilora/assets/base/tokenizer_config.json")
                   .read_text())["chat_template"],
    }
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(fields) - header == set(expected_keys)
    for key, value in expected_keys.items():
        assert fields[key] == value, key

    expected = expected_tensors(model, arch)
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_allclose(values(t), w.numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_dtypes_hold_the_weights_to_their_rounding(dtype: str, tok: Tokenizer,
                                                         tmp_path: Path) -> None:
    model = tiny("llama", tok.vocab_size, tied=False)
    export_gguf(model, tok, tmp_path / "m.gguf", dtype=dtype)
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    kind = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    for name, w in expected_tensors(model, "llama").items():
        t, w = tensors[name], w.numpy()
        got = values(t)
        if w.ndim == 1:  # norms stay f32, as llama.cpp's converter writes them
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(got, w)
        elif dtype == "f16":
            assert t.tensor_type.name == kind
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
        elif dtype == "bf16":
            assert t.tensor_type.name == kind  # round to nearest even, as torch rounds
            want = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, want)
        else:  # blocks of 32 with one f16 scale d = max|x| / 127: error at most d / 2
            assert t.tensor_type.name == kind
            blocks = w.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            d16 = d.astype(np.float16).astype(np.float32)
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= d16 * 0.5 + np.abs(d16 - d) * 127 + 1e-7).all(), name


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_only_file_holds_a_and_b_and_the_scale(rslora: bool, tok: Tokenizer,
                                                       tmp_path: Path) -> None:
    model = tiny("llama", tok.vocab_size)
    torch.manual_seed(3)
    inject_lora(model, LoraConfig(r=4, alpha=6, targets=["q_proj", "k_proj", "v_proj",
                                                         "down_proj"], use_rslora=rslora))
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B["default"].weight)
    report = export_gguf(model, None, tmp_path / "a.gguf", dtype="f32", adapter_only=True)
    fields, tensors = read(tmp_path / "a.gguf")
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(fields) - header == {"general.architecture", "general.type", "general.name",
                                    "adapter.type", "adapter.lora.alpha", "general.file_type",
                                    "general.quantization_version"}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    # llama.cpp scales by alpha / r, r read from lora_a's rows: that must be minilora's scaling
    scaling = 6 / math.sqrt(4) if rslora else 6 / 4
    assert fields["adapter.lora.alpha"] / 4 == pytest.approx(scaling)
    assert report.alpha == pytest.approx(fields["adapter.lora.alpha"])
    layers = dict(lora_modules(model))
    assert len(tensors) == 2 * len(layers)
    heads = {"q_proj": 4, "k_proj": 2}
    for path, m in layers.items():
        base = gguf_name(f"{path}.weight").removesuffix(".weight")
        a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
        short = path.rsplit(".", 1)[-1]
        if short in heads:  # the rotary rows of q / k: B's rows, as W's
            b = interleaved_rows(b, heads[short])
        np.testing.assert_array_equal(values(tensors[f"{base}.weight.lora_a"]), a.numpy())
        np.testing.assert_array_equal(values(tensors[f"{base}.weight.lora_b"]), b.numpy())


def test_refused_models_and_adapters_write_nothing(tok: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    moe = CausalLM(ModelConfig(model_type="minimind", minimind_generation="minimind3",
                               vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4, use_moe=True))
    with pytest.raises(ExportError, match="mixture of experts"):
        export_gguf(moe, tok, out)
    yarn = CausalLM(ModelConfig(model_type="minimind", minimind_generation="minimind3",
                                vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4,
                                rope_scaling={"factor": 4.0}))
    with pytest.raises(ExportError, match="YaRN"):
        export_gguf(yarn, tok, out)

    dora = tiny("llama", tok.vocab_size)
    inject_lora(dora, LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf(dora, tok, out, adapter_only=True)
    export_gguf(dora, tok, out)  # merged, DoRA is exact
    out.unlink()

    pissa = tiny("llama", tok.vocab_size)
    inject_lora(pissa, LoraConfig(r=2, targets=["q_proj"], init="pissa"))
    with pytest.raises(ExportError, match="PiSSA saved against its residual base"):
        export_gguf(pissa, tok, out, adapter_only=True)

    head = tiny("llama", tok.vocab_size)
    inject_lora(head, LoraConfig(r=2, targets=["lm_head"]))
    with pytest.raises(ExportError, match="output head"):
        export_gguf(head, tok, out, adapter_only=True)
    with torch.no_grad():
        lora_modules(head)[0][1].lora_B["default"].weight.fill_(0.5)
    export_gguf(head, tok, out, dtype="f32")  # merged: the head is a tensor beside the embedding
    _, tensors = read(out)
    np.testing.assert_allclose(values(tensors["output.weight"]),
                               expected_tensors(head, "llama")["output.weight"].numpy(),
                               atol=1e-6)
    assert not np.allclose(values(tensors["output.weight"]),
                           values(tensors["token_embd.weight"]))
    out.unlink()

    broken = tiny("llama", tok.vocab_size)
    add_random_adapter(broken, "default", seed=2, targets=["v_proj"])
    with torch.no_grad():
        lora_modules(broken)[0][1].lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match="inf or NaN in blk.0.attn_v.weight"):
        export_gguf(broken, tok, out, dtype="f32")
    big = tiny("llama", tok.vocab_size)
    with torch.no_grad():
        big.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(ExportError, match="blk.1.ffn_up.weight does not fit f16"):
        export_gguf(big, tok, out, dtype="f16")
    export_gguf(big, tok, out, dtype="bf16")  # bf16 has float32's range
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no temporary file left


def test_quantized_base_is_refused(tok: Tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="the qlora extra")
    from minilora.lora.qlora import quantize_model

    model = tiny("llama", tok.vocab_size).requires_grad_(False)
    quantize_model(model, "int8")
    with pytest.raises(ExportError, match="int8-quantized.*full-precision base"):
        export_gguf(model, tok, tmp_path / "q.gguf")
    assert not any(tmp_path.iterdir())


def _with_pre_tokenizer(tok: Tokenizer, pre: dict) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(tok.to_json())
    data["pre_tokenizer"] = pre
    return Tokenizer(HFTokenizer.from_str(json.dumps(data)))


def test_a_pre_tokenizer_llama_cpp_splits_differently_is_refused(tok: Tokenizer,
                                                                 tmp_path: Path) -> None:
    model = tiny("llama", tok.vocab_size)
    prefix = _with_pre_tokenizer(tok, {"type": "ByteLevel", "add_prefix_space": True,
                                       "trim_offsets": True, "use_regex": True})
    with pytest.raises(ExportError, match="splits 'Hello world' differently from llama.cpp's "
                                          "gpt-2 pre-tokenizer"):
        export_gguf(model, prefix, tmp_path / "m.gguf")
    digits = _with_pre_tokenizer(tok, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]})
    with pytest.raises(ExportError, match="none that llama.cpp knows by name"):
        export_gguf(model, digits, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())
    for name in ("qwen2", "llama-bpe"):  # a Split by their regexes, then bytes: named
        split = _with_pre_tokenizer(tok, llama_cpp_pre_tokenizer(name))
        assert export_gguf(model, split, tmp_path / f"{name}.gguf").pre_tokenizer == name
        assert read(tmp_path / f"{name}.gguf")[0]["tokenizer.ggml.pre"] == name


def test_export_leaves_the_model_as_it_was_and_disabled_adapters_out(tok: Tokenizer,
                                                                     tmp_path: Path) -> None:
    from minilora.lora.injection import disabled

    model = tiny("llama", tok.vocab_size)
    add_random_adapter(model, "default", seed=4, targets=["q_proj", "down_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_gguf(model, tok, tmp_path / "merged.gguf", dtype="f32")
    with disabled(model):
        export_gguf(model, tok, tmp_path / "base.gguf", dtype="f32")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, merged = read(tmp_path / "merged.gguf")
    _, base = read(tmp_path / "base.gguf")
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(values(base["blk.0.attn_q.weight"]),
                                  interleaved_rows(w, 4).numpy())
    assert not np.allclose(values(merged["blk.0.attn_q.weight"]),
                           values(base["blk.0.attn_q.weight"]))


def test_a_second_export_into_a_folder_in_use_is_refused(tok: Tokenizer, tmp_path: Path) -> None:
    import fcntl
    import os

    from minilora.core.errors import OutputError

    model = tiny("llama", tok.vocab_size)
    fd = os.open(tmp_path, os.O_RDONLY)  # what a running export holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="another export is writing into"):
            export_gguf(model, tok, tmp_path / "m.gguf")
    finally:
        os.close(fd)
    assert not any(tmp_path.iterdir())
    export_gguf(model, tok, tmp_path / "m.gguf")  # released: it writes
    with pytest.raises(OutputError, match="exists; nothing is overwritten without --overwrite"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    export_gguf(model, tok, tmp_path / "m.gguf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_lora_on_a_tied_embedding_exports_the_changed_table_beside_the_base_head(
        tok: Tokenizer, tmp_path: Path) -> None:
    """LoRA on the embedding changes the lookup only (PEFT's lora.Embedding): the file holds
    token_embd = W + scaling * (B @ A).T (PEFT's get_delta_weight) and, although the model is
    tied, an output tensor with the base table, which llama.cpp then reads as the head."""
    model = tiny("llama", tok.vocab_size)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    _, tensors = read(tmp_path / "m.gguf")
    emb = model.model.embed_tokens
    a, b = emb.lora_A["default"].weight.detach(), emb.lora_B["default"].weight.detach()
    table = base + (b @ a).T * (8 / 4)
    np.testing.assert_allclose(values(tensors["token_embd.weight"]), table.numpy(), rtol=0,
                               atol=1e-6)
    np.testing.assert_array_equal(values(tensors["output.weight"]), base.numpy())
