"""llama.cpp itself (llama-cpp-python) loads what `minilora export` wrote and computes what
minilora computes: the same tokens, the same logits within a tolerance per dtype, the same greedy
tokens, the adapter file over the base equal to the merged file, a chat that stops at the end of
its turn. The comparisons live in benchmarks/gguf_parity.py (which prints docs/formats.md's
table); here they are asserted.

Skipped where llama-cpp-python is not installed: it has no wheel, and `make test-gguf` builds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra (pip install 'minilora[gguf]')")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; `make test-gguf` "
                                        "builds it from source and runs these tests")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gguf_parity as parity  # noqa: E402

from minilora.data.tokenizer import Tokenizer  # noqa: E402
from minilora.decoding.chat import chat_answerer  # noqa: E402
from minilora.export.gguf import export_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# max |llama.cpp logit - minilora logit| / max |minilora logit|, per dtype of the file. f32: the
# two differ only in the order of float32 sums; the others: the weights' rounding (f16 and bf16
# keep 11 and 8 significant bits, q8_0 an 8-bit value per weight with one f16 scale per 32),
# which llama.cpp also applies to the activations it multiplies them with.
TOLERANCE = {"f32": 1e-4, "f16": 3e-3, "bf16": 1e-2, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(parity.ASSETS / "base")


# Every dtype on the embedded model and on Llama; f32 and q8_0 on the other architectures (the
# whole matrix is benchmarks/gguf_parity.py's table in docs/formats.md): about a minute.
CASES = [(kind, dtype) for kind in parity.MODELS for dtype in parity.DTYPES
         if kind in ("embedded", "llama") or dtype in ("f32", "q8_0")]


@pytest.mark.parametrize(("kind", "dtype"), CASES)
def test_llama_cpp_computes_what_minilora_computes(kind: str, dtype: str, tok: Tokenizer,
                                                   tmp_path: Path) -> None:
    model = parity.build(kind, tok)
    rows = parity.parity(model, tok, tmp_path, dtype)
    assert [r["form"] for r in rows] == ["merged", "adapter"]
    for row in rows:
        assert row["tokenization_equal"], row
        assert row["rel"] <= TOLERANCE[dtype], row
        if dtype == "f32":  # rounding may flip a near tie in the lower dtypes
            assert row["greedy_equal"], row


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_llama_cpp_splits_as_the_split_pre_tokenizers_say(pre: str, tok: Tokenizer,
                                                          tmp_path: Path) -> None:
    """Qwen2's and Llama 3's regexes, which llama.cpp rewrites for its own regex engine."""
    variant = parity.with_pre_tokenizer(tok, pre)
    model = parity.build("embedded", variant)
    report = export_gguf(model, variant, tmp_path / "m.gguf", dtype="f32")
    assert report.pre_tokenizer == pre
    assert parity.tokenization_equal(parity.llama(tmp_path / "m.gguf"), variant)


def test_a_chat_uses_the_template_and_stops_at_the_end_of_its_turn(tok: Tokenizer,
                                                                   tmp_path: Path) -> None:
    model = parity.build("embedded", tok)
    with torch.no_grad():  # the embedded model as trained: its answers end with <|im_end|>
        for _, m in parity.lora_modules(model):
            m.lora_B["default"].weight.zero_()
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, dtype="f32")
    llm = parity.llama(path)
    answer = chat_answerer(model, tok, max_new_tokens=64, eos_token_id=tok.stop_token_ids)
    for question in ("What is your name?", "What is 3 plus 4?"):
        messages = [{"role": "user", "content": question}]
        reply = llm.create_chat_completion(messages, max_tokens=64, temperature=0.0)
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # <|im_end|>, not the token limit
        assert choice["message"]["content"].strip() == answer(messages)
        assert reply["usage"]["prompt_tokens"] == len(tok.encode_chat(
            messages, add_generation_prompt=True)[0])
