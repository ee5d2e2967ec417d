"""A mixed batch (one adapter per row) whose adapter trains the output head itself (a module
to save, or trainable token rows on the head): the loss is never the base head's for every row."""

from __future__ import annotations

import pytest
import torch

from minilora.core.errors import ConfigError
from minilora.lora.injection import inject_lora
from minilora.lora.layer import LoraConfig
from minilora.model.config import ModelConfig
from minilora.model.decoder import CausalLM


def _model(**extras) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, intermediate_size=64,
                      tie_word_embeddings=False)
    model = CausalLM(cfg)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], **extras), name="a")
    with torch.no_grad():  # the head's trained values differ from the base's
        for n, p in model.named_parameters():
            if "modules_to_save" in n or "trainable_tokens_delta" in n:
                p.normal_()
    return model


@pytest.mark.parametrize("extras", [dict(modules_to_save=["lm_head"]),
                                    dict(trainable_token_indices={"lm_head": [1, 2, 3]})],
                         ids=["saved-head", "head-rows"])
def test_a_mixed_batch_loss_never_uses_one_head_for_every_row(extras) -> None:
    model = _model(**extras)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # the logits route per row: row 0 through the trained head
        mixed = model(x, adapter_names=["a", None]).logits
        base = model(x, adapter_names=[None, None]).logits
    assert not torch.allclose(mixed[0], base[0]) and torch.equal(mixed[1], base[1])
    # The loss path flattens the rows; a head routed per row cannot run flattened, so it is
    # refused (it was the base head's loss for every row, silently).
    with pytest.raises(ConfigError, match="mixed batch"):
        model(x, labels=x, adapter_names=["a", None])


def test_the_routing_finds_every_module_to_save_and_trainable_tokens() -> None:
    """The mixed batch's own walk (which skips the LoRA layers' insides) finds what
    `saved_layers` and `token_layers` find."""
    from minilora.lora.named import _extra_layers
    from minilora.lora.saved_modules import saved_layers
    from minilora.lora.trainable_tokens import token_layers

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False))
    for name in ("a", "b"):
        inject_lora(model, LoraConfig(r=2, alpha=4, targets="all-linear",
                                      modules_to_save=["lm_head"],
                                      trainable_token_indices=[3, 5]), name=name)
    want = saved_layers(model) + token_layers(model)
    assert len(want) == 2
    got = _extra_layers(model)
    assert sorted(n for n, _ in got) == sorted(n for n, _ in want)
    assert {id(m) for _, m in got} == {id(m) for _, m in want}
