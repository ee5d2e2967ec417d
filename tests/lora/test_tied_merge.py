"""Merging a LoRA on a tied lm_head: the merged model unties it and computes what the adapted
model computed (it was refused); transformers reads the written folder to the same logits."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from helpers import add_random_adapter, tiny_model
from minilora.lora.injection import merge_and_unload
from minilora.model.io import load_model, save_model

torch.set_num_threads(1)


def test_merging_a_lora_on_a_tied_lm_head_writes_an_untied_model_equal_to_the_adapted_one(
        tmp_path: Path) -> None:
    model = tiny_model(64).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    embedding = model.model.embed_tokens.weight.detach().clone()
    add_random_adapter(model, "default", seed=1, targets=["lm_head", "q_proj"])
    x = torch.arange(40).view(2, 20) % 64
    with torch.no_grad():
        adapted = model(x).logits
    merged = merge_and_unload(model)
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.model.embed_tokens.weight, embedding)  # the input side unchanged
    save_model(merged, tmp_path / "merged")
    again = load_model(tmp_path / "merged").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ours, theirs = again(x).logits, hf(x).logits
    # float32 throughout; the merge folds B A into W once, so only rounding differs
    torch.testing.assert_close(ours, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs, adapted, rtol=0, atol=1e-5)
    assert (adapted - model_without_adapter(tmp_path, embedding, x)).abs().max() > 1e-3


def model_without_adapter(tmp_path: Path, embedding: torch.Tensor, x: torch.Tensor
                          ) -> torch.Tensor:
    """The base's logits (the adapter must have changed something for the test to mean it)."""
    base = tiny_model(64).eval()
    assert torch.equal(base.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        return base(x).logits


def test_merging_a_lora_on_a_tied_embedding_writes_an_untied_model_equal_to_the_adapted_one(
        tmp_path: Path) -> None:
    """LoRA on the embedding of a tied model changes the lookup only (the head reads the base
    table, as in PEFT): merged, the table gets a copy of its own and transformers reads the
    written folder to the adapted model's logits."""
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig, lora_modules

    model = tiny_model(64).eval()
    head = model.lm_head.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.arange(40).view(2, 20) % 64
    with torch.no_grad():
        adapted = model(x).logits
    merged = merge_and_unload(model)
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.lm_head.weight, head)  # the output side unchanged
    save_model(merged, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, adapted, rtol=0, atol=1e-5)
    assert (adapted - model_without_adapter(tmp_path, head, x)).abs().max() > 1e-3
