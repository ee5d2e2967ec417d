"""modules_to_save and trainable_token_indices, checked against PEFT on the same weights.

The reference is PEFT itself (ModulesToSaveWrapper, TrainableTokensWrapper): a PEFT adapter
with trained copies / rows loads into minilora with PEFT's logits, ours loads into PEFT with
ours; tolerance 1e-5 in float32 (the same ops in another order at most).
"""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import minilora_twin, tiny_llama
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.core.errors import AdapterError, ConfigError
from minilora.lora.config import LoraConfig
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.injection import (
    disabled,
    inject_lora,
    lora_parameters,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minilora.lora.named import delete_adapter, set_active
from minilora.lora.saved_modules import SavedModule
from minilora.lora.trainable_tokens import TrainableTokens

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64
TOKENS = [3, 7, 50]


def llama(tied: bool, seed: int = 0) -> nn.Module:
    return tiny_llama(VOCAB, tied, seed)


twin = minilora_twin


def ids() -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    x[0, :3] = torch.tensor(TOKENS)  # the trained rows are read
    return x


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Every trainable value (LoRA B, the copies, the rows) moved off its start."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


CASES = {
    "saved-head-untied": (False, {"modules_to_save": ["lm_head"]}),
    "saved-head-tied": (True, {"modules_to_save": ["lm_head"]}),
    "saved-norm-embed": (False, {"modules_to_save": ["model.norm", "embed_tokens"]}),
    "tokens-untied": (False, {"trainable_token_indices": TOKENS}),
    "tokens-tied": (True, {"trainable_token_indices": TOKENS}),
    "tokens-dict": (False, {"trainable_token_indices": {"embed_tokens": TOKENS,
                                                        "lm_head": [1, 2]}}),
    "saved-embed-tied": (True, {"modules_to_save": ["embed_tokens"]}),
    "tokens-dict-tied": (True, {"trainable_token_indices": {"embed_tokens": TOKENS,
                                                            "lm_head": TOKENS}}),
}
OURS = {"modules_to_save": "modules_to_save",
        "trainable_token_indices": "trainable_token_indices"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_with_peft_logits_and_ours_loads_into_peft(tmp_path, case):
    tied, extra = CASES[case]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    theirs = peft.get_peft_model(llama(tied), cfg)
    perturb(theirs)
    theirs.eval()
    x = ids()
    want = logits(theirs, x)
    assert not torch.allclose(want, logits(llama(tied), x), atol=1e-3)  # the extras count
    theirs.save_pretrained(str(tmp_path / "peft"))

    for ours in (llama(tied), twin(llama(tied))):  # transformers' model, and minilora's own
        load_adapter(ours, tmp_path / "peft")
        torch.testing.assert_close(logits(ours, x), want, rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        our_keys = set(f.keys())
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert our_keys == set(f.keys())  # PEFT's file keys, one for one
    again = peft.PeftModel.from_pretrained(llama(tied), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(again, x), want, rtol=1e-5, atol=1e-5)

    # merged equals unmerged; the fingerprint is of the base, so unmerging gives it back
    before = base_fingerprint(ours)
    merge_lora(ours)
    torch.testing.assert_close(logits(ours, x), want, rtol=1e-5, atol=1e-5)
    unmerge_lora(ours)
    assert base_fingerprint(ours) == before
    merge_and_unload(ours)
    assert not any(isinstance(m, (SavedModule, TrainableTokens)) for m in ours.modules())
    torch.testing.assert_close(logits(ours, x), want, rtol=1e-5, atol=1e-5)


def test_rows_and_copies_train_alone_and_the_tied_head_follows():
    model = twin(llama(True))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoraConfig(r=2, alpha=4, targets=["q_proj"], trainable_token_indices=TOKENS,
                                  modules_to_save=["model.norm"]))
    assert set(model.state_dict()) >= set(base)  # the base's own keys unchanged
    mark_trainable(model)
    params = lora_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    x = ids()
    loss = model(x, labels=x).loss  # the chunked loss, through the rows of the tied head
    loss.backward()
    rows = model.model.embed_tokens.delta("default")
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    # the same loss from the logits (the wrapped head's own forward)
    full = nn.functional.cross_entropy(model(x).logits[:, :-1].flatten(0, 1).float(),
                                       x[:, 1:].flatten())
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    torch.optim.SGD(params, lr=1.0).step()
    with disabled(model):
        # the base: its embedding untouched, the copy of the norm not run
        for k, v in base.items():
            torch.testing.assert_close(model.state_dict()[k], v)
    delete_adapter(model, "default")
    assert sorted(model.state_dict()) == sorted(base)
    assert not any(isinstance(m, (SavedModule, TrainableTokens)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("config, message", [
    ({"modules_to_save": ["no_such"]}, "'no_such' matches no module"),
    ({"modules_to_save": ["q_proj"]}, "LoRA layer"),
    ({"trainable_token_indices": [VOCAB]}, "outside the vocabulary"),
    ({"trainable_token_indices": {"nothing": [1]}}, "matches no Embedding"),
])
def test_bad_choices_are_refused_and_change_nothing(config, message):
    model = llama(False)
    keys = sorted(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        inject_lora(model, LoraConfig(r=2, targets=["q_proj"], **config))
    assert sorted(model.state_dict()) == keys


@pytest.mark.parametrize("value", [[-1], [1.5], [True], [2, 2], {"embed_tokens": []}])
def test_bad_token_ids_are_refused_by_the_config(value):
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(trainable_token_indices=value)


def test_peft_config_with_ensure_weight_tying_is_refused(tmp_path):
    model = llama(True)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[1]))
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == [1] and cfg["modules_to_save"] is None
    cfg["ensure_weight_tying"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="ensure_weight_tying"):
        load_adapter(llama(True), tmp_path / "a")


def test_two_adapters_switch_their_copies_and_rows():
    model = llama(False)
    x = ids()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"],
                                  trainable_token_indices=TOKENS), name="a")
    mark_trainable(model)  # the active adapter's values only: those perturb moves
    perturb(model, 1)
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"], modules_to_save=["lm_head"],
                                  trainable_token_indices=[4]), name="b")
    mark_trainable(model)
    perturb(model, 2)
    out_b = logits(model, x)
    set_active(model, "a")
    out_a = logits(model, x)
    assert not torch.allclose(out_a, out_b)
    set_active(model, None)
    torch.testing.assert_close(logits(model, x), logits(llama(False), x))
    with pytest.raises(ConfigError, match="one of them at a time"):
        set_active(model, ["a", "b"])


def test_a_head_with_rows_or_a_saved_linear_head_keeps_the_chunked_loss():
    from minilora.training.optimizer import param_groups

    for tied, extra in ((True, {"trainable_token_indices": TOKENS}),
                        (False, {"modules_to_save": ["lm_head", "model.norm"]})):
        model = twin(llama(tied))
        inject_lora(model, LoraConfig(r=2, targets=["q_proj"], **extra))
        mark_trainable(model)
        assert model._head_linear() is not None  # the head says its linear map
        params = lora_parameters(model)
        slow, fast = param_groups(model, params, 1e-3, 0.0, ratio=16.0)
        # LoRA+: only B at the larger rate; the copies (a norm's 1-D weight too) and rows at A's
        assert {id(p) for p in fast["params"]} == {
            id(m.lora_B["default"].weight) for m in model.modules() if hasattr(m, "lora_B")}
        assert len(slow["params"]) == len(params) - len(fast["params"])


def test_gguf_writes_the_model_the_rows_and_copies_make_and_refuses_them_as_an_adapter(
        tmp_path):
    """llama.cpp's LoRA adapter format holds A and B only: the model file holds them merged."""
    gguf = pytest.importorskip("gguf")
    from helpers import tiny_model, tiny_tokenizer
    from minilora.core.errors import ExportError
    from minilora.export.gguf import export_gguf

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)  # tied
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[5, 9],
                                  modules_to_save=["model.norm"]))
    mark_trainable(model)
    perturb(model)
    want = {k: v.clone() for k, v in merge_and_unload(deepcopy(model)).state_dict().items()}
    with pytest.raises(ExportError, match="cannot hold; export the merged model"):
        export_gguf(model, tok, tmp_path / "a.gguf", adapter_only=True)
    export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}

    def values(name):
        t = tensors[name]
        return torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(
            tuple(reversed(t.shape.tolist()))))

    torch.testing.assert_close(values("token_embd.weight"), want["model.embed_tokens.weight"])
    torch.testing.assert_close(values("output_norm.weight"), want["model.norm.weight"])
    assert "output.weight" not in tensors  # still tied: the rows are the head's too
    assert isinstance(model.model.norm, SavedModule)  # the model itself left as it was


def test_combine_and_minimind_refuse_what_they_cannot_hold(tmp_path):
    from minilora.lora.named import combine_adapters

    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[5]),
                name="a")
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="b")
    with pytest.raises(ConfigError, match="do not combine"):
        combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    with pytest.raises(AdapterError, match="MiniMind's .pth holds LoRA A and B only"):
        save_adapter(model, tmp_path / "a.pth", format="minimind", name="a")


def test_a_second_adapter_adapts_the_base_layers_not_the_first_ones_copies():
    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head", "mlp"]),
                name="a")
    with pytest.raises(ConfigError, match="inside a module another adapter saves"):
        inject_lora(model, LoraConfig(r=2, targets=["up_proj"]), name="b")
    report = inject_lora(model, LoraConfig(r=2, targets="all-linear", exclude=["mlp.up_proj",
                                           "mlp.down_proj", "mlp.gate_proj"]), name="c")
    assert all(".modules_to_save." not in n for n, _, _ in report.modules)


@pytest.mark.parametrize("tied", [False, True])
def test_a_mixed_batch_gives_each_row_its_adapters_copies_and_rows(tied):
    model = twin(llama(tied))
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=TOKENS,
                                  modules_to_save=["model.norm"]), name="a")
    mark_trainable(model)
    perturb(model, 1)
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"], modules_to_save=["model.norm"]),
                name="b")
    mark_trainable(model)
    perturb(model, 2)
    x = ids().repeat(2, 1)[:3]
    alone = {}
    for name in ("a", "b", None):
        set_active(model, name)
        alone[name] = logits(model, x)
    assert not torch.allclose(alone["a"], alone["b"]) and not torch.allclose(alone["a"],
                                                                              alone[None])
    with torch.no_grad():
        mixed = model(x, adapter_names=["a", "b", None]).logits.float()
    for row, name in enumerate(("a", "b", None)):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


def test_rows_and_lora_on_one_embedding_are_refused_lora_beside_a_saved_head_works(tmp_path):
    model = llama(False)
    with pytest.raises(ConfigError, match="which LoRA or modules to save already train"):
        inject_lora(model, LoraConfig(r=2, targets=["embed_tokens", "q_proj"],
                                      trainable_token_indices=TOKENS))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                          modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(llama(False), cfg)
    perturb(theirs)
    theirs.eval()
    x = ids()
    theirs.save_pretrained(str(tmp_path / "peft"))
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


def test_a_module_to_save_never_swallows_another_adapters_lora_or_rows():
    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    keys = sorted(model.state_dict())
    with pytest.raises(ConfigError, match="LoRA layer or trainable tokens"):
        inject_lora(model, LoraConfig(r=2, targets=["v_proj"], modules_to_save=["self_attn"]),
                    name="b")
    assert sorted(model.state_dict()) == keys
    # rows first, then a copy of their embedding; and the other order
    model = llama(True)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[3, 5]),
                name="a")
    for saved in (["embed_tokens"], ["lm_head"]):  # a tied head reads the rows too
        with pytest.raises(ConfigError, match="LoRA layer or trainable tokens"):
            inject_lora(model, LoraConfig(r=2, targets=["v_proj"], modules_to_save=saved),
                        name="b")
    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"], modules_to_save=["embed_tokens"]),
                name="b")
    for tokens in ([3, 5], {"embed_tokens": [3, 5]}):
        with pytest.raises(ConfigError, match=r"model\.embed_tokens is, holds or sits in "
                                              r"model\.embed_tokens, which adapter 'b' saves"):
            inject_lora(model, LoraConfig(r=2, targets=["q_proj"],
                                          trainable_token_indices=tokens), name="a")
    assert not any(isinstance(m, TrainableTokens) for m in model.modules())
    with pytest.raises(ConfigError, match="LoRA targets model.embed_tokens, a module another "
                                          "adapter saves whole"):
        inject_lora(model, LoraConfig(r=2, targets=["embed_tokens"]), name="a")


def test_lora_on_the_embedding_and_rows_of_another_adapter_are_refused_by_name():
    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["embed_tokens"]), name="a")
    with pytest.raises(ConfigError, match="model.embed_tokens has LoRA of adapter 'a'; an "
                                          "embedding trains one way"):
        inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[3]),
                    name="b")
    model = llama(False)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[3]),
                name="a")
    with pytest.raises(ConfigError, match="model.embed_tokens has trainable tokens of adapter "
                                          "'a'; an embedding trains one way"):
        inject_lora(model, LoraConfig(r=2, targets=["embed_tokens"]), name="b")


def test_lora_on_a_tied_embedding_with_a_saved_head_merges_to_the_same_logits():
    model = llama(True)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj", "embed_tokens"],
                                  modules_to_save=["lm_head"]))
    mark_trainable(model)
    perturb(model)
    x = ids()
    before = logits(model, x)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, (SavedModule, TrainableTokens)) for m in merged.modules())
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(logits(merged, x), before, rtol=1e-5, atol=1e-5)
