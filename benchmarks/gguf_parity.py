"""llama.cpp (through llama-cpp-python) against minilora on files `minilora export` wrote.

For each model (the embedded one with an adapter; tiny random Llama, Qwen2, Qwen3, MiniMind2 and
current MiniMind models with a random all-linear adapter), each dtype, and each form (the merged
model; the base file with the adapter-only file applied through ``lora_path``):

- tokenization: llama.cpp's ``tokenize(special=True)`` equals minilora's on a corpus with the chat
  template's special tokens, unicode and whitespace runs (the exporter's probe corpus plus more);
- logits: llama.cpp's ``logits_all`` scores against minilora's forward on the same tokens; the
  table gives max |difference| / max |minilora logit| (relative);
- greedy: 16 tokens, argmax at each step, llama.cpp's against minilora's.

    python benchmarks/gguf_parity.py            # the table of docs/formats.md
    python benchmarks/gguf_parity.py --models embedded --dtypes f32

Needs the ``gguf`` and ``llama`` extras (llama-cpp-python, built from source).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilora.data.tokenizer import Tokenizer
from minilora.export.gguf import export_gguf, probe_corpus
from minilora.lora.config import LoraConfig
from minilora.lora.injection import inject_lora
from minilora.lora.layer import lora_modules
from minilora.model.config import ModelConfig
from minilora.model.decoder import CausalLM
from minilora.model.io import load_model

ASSETS = Path(__file__).resolve().parents[1] / "minilora" / "assets"
MODELS = ("embedded", "llama", "qwen2", "qwen3", "minimind2", "minimind")
DTYPES = ("f32", "f16", "bf16", "q8_0")
FORMS = ("merged", "adapter")
# More text than the exporter's probe: longer whitespace runs, mixed scripts, special tokens
# glued to words, a second chat.
EXTRA_TEXTS = (
    "<|im_start|>user\nwhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y<|endoftext|>z", "\t\t  \n \n  tail   ", "Ünïcödé ñ 😀😀 ∂x/∂t", "aaaa" * 20,
)
PROMPT = "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"
F32 = 0  # GGML_TYPE_F32
_CHANGES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2", "attention_bias": True},
    "qwen3": {"model_type": "qwen3", "qk_norm": True, "head_dim": 32},
    "minimind2": {"model_type": "minimind", "minimind_generation": "minimind2"},
    "minimind": {"model_type": "minimind", "minimind_generation": "minimind3", "qk_norm": True},
}


def build(kind: str, tokenizer: Tokenizer, adapter: Path | None = None, seed: int = 0
          ) -> CausalLM:
    """The model (an adapter injected, B random unless ``adapter`` is a trained one)."""
    if kind == "embedded":
        model = load_model(ASSETS / "base")
        if adapter is not None:
            from minilora.adapters.folder import load_adapter

            load_adapter(model, adapter)
            return model.eval()
    else:
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512,
                             rope_theta=10000.0, tie_word_embeddings=True, **_CHANGES[kind])
        model = CausalLM(config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0, 0.5)  # logits of a few units, not 0.01
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    torch.manual_seed(seed + 1)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["default"].weight.normal_(0, 0.05)
    return model.eval()


@torch.no_grad()
def our_logits(model: CausalLM, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def our_greedy(model: CausalLM, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def llama(path: Path, lora: Path | None = None) -> Any:
    from llama_cpp import Llama

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        # the KV cache in f32 (llama.cpp's default is f16): the comparison is of the file's
        # weights, not of the cache's rounding
        return Llama(model_path=str(path), lora_path=None if lora is None else str(lora),
                     n_ctx=256, logits_all=True, n_threads=1, verbose=False,
                     type_k=F32, type_v=F32)


def their_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def their_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def with_pre_tokenizer(tokenizer: Tokenizer, name: str) -> Tokenizer:
    """The tokenizer with llama.cpp's pre-tokenizer ``name`` (gpt-2, qwen2, llama-bpe)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    from minilora.export.gguf import llama_cpp_pre_tokenizer

    data = json.loads(tokenizer.to_json())
    data["pre_tokenizer"] = llama_cpp_pre_tokenizer(name)
    return Tokenizer(HFTokenizer.from_str(json.dumps(data)),
                     chat_template=tokenizer.chat_template)


def corpus(tokenizer: Tokenizer) -> list[str]:
    return probe_corpus(tokenizer) + list(EXTRA_TEXTS)


def tokenization_equal(llm: Any, tokenizer: Tokenizer) -> bool:
    return all(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
               == tokenizer.encode(t) for t in corpus(tokenizer))


def export_pair(model: CausalLM, tokenizer: Tokenizer, folder: Path, dtype: str
                ) -> tuple[Path, Path, Path]:
    """merged.gguf, base.gguf (the same model, adapter off) and adapter.gguf."""
    from minilora.lora.injection import disabled

    merged, base, adapter = (folder / f"{n}-{dtype}.gguf" for n in ("merged", "base", "adapter"))
    export_gguf(model, tokenizer, merged, dtype=dtype, overwrite=True)
    with disabled(model):
        export_gguf(model, tokenizer, base, dtype=dtype, overwrite=True)
    export_gguf(model, tokenizer, adapter, dtype=dtype, adapter_only=True, overwrite=True)
    return merged, base, adapter


def parity(model: CausalLM, tokenizer: Tokenizer, folder: Path, dtype: str) -> list[dict]:
    """One row per form: relative max logit difference, greedy tokens equal, tokenization
    equal."""
    merged, base, adapter = export_pair(model, tokenizer, folder, dtype)
    ids = tokenizer.encode(PROMPT + "I am a small model. 12 + 7 = 19.")
    ours = our_logits(model, ids)
    prompt = tokenizer.encode(PROMPT)
    greedy = our_greedy(model, prompt, 16)
    rows = []
    for form, llm in (("merged", llama(merged)), ("adapter", llama(base, lora=adapter))):
        theirs = their_logits(llm, ids)
        rows.append({
            "form": form, "dtype": dtype,
            "rel": float(np.abs(theirs - ours).max() / np.abs(ours).max()),
            "abs": float(np.abs(theirs - ours).max()),
            "greedy_equal": their_greedy(llm, prompt, 16) == greedy,
            "tokenization_equal": tokenization_equal(llm, tokenizer),
        })
        llm.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--adapter", default=None,
                        help="a trained adapter of the embedded model (default: a random one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(ASSETS / "base")
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, 1 thread")
    print(f"{'model':<10} {'dtype':<5} {'form':<8} {'max |dlogit| / max |logit|':>27} "
          f"{'max |dlogit|':>13} {'greedy 16 equal':>16} {'tokenization equal':>19}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            model = build(kind, tokenizer, Path(args.adapter) if args.adapter and
                          kind == "embedded" else None)
            for dtype in args.dtypes:
                for row in parity(model, tokenizer, Path(tmp), dtype):
                    print(f"{kind:<10} {dtype:<5} {row['form']:<8} {row['rel']:>27.2e} "
                          f"{row['abs']:>13.2e} {str(row['greedy_equal']):>16} "
                          f"{str(row['tokenization_equal']):>19}")
                    sys.stdout.flush()


if __name__ == "__main__":
    main()
