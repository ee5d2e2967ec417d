"""LoRA on the embedding table (minilora.lora.embedding), checked against PEFT's LoRA for
nn.Embedding on the same weights: a tiny transformers Llama, tied and untied, and minilora's
own model holding its weights. The reference is PEFT's PeftModel (or PEFT's
create_loraplus_optimizer for the optimizer groups), never minilora's own path."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import minilora_twin, tiny_llama
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.core.errors import AdapterError, ConfigError, FingerprintMismatch
from minilora.lora.embedding import LoRAEmbedding
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
from minilora.lora.layer import LoraConfig, lora_modules
from minilora.lora.named import combine_adapters, delete_adapter, mixed_adapters, set_active

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
TARGETS = ["embed_tokens", "q_proj", "v_proj"]
EMBED = "model.embed_tokens"


def llama(tied: bool, seed: int = 0) -> nn.Module:
    return tiny_llama(VOCAB, tied, seed)


twin = minilora_twin


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def perturb(model: nn.Module, seed: int = 3, name: str = "default") -> None:
    """Random A and B on every LoRA layer, so the embedding's A (zero at init) counts too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (m.lora_A[name].weight, m.lora_B[name].weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_adapter(tied: bool, tmp_path, **extra) -> tuple[torch.Tensor, object]:
    """A PEFT adapter on embed_tokens + q/v, perturbed and saved: (its logits, its folder)."""
    model = peft.get_peft_model(llama(tied), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, **extra)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = tmp_path / "peft"
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        model.save_pretrained(str(folder))
    return logits(model, ids()), folder


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_peft_embedding_adapter_loads_with_peft_logits(tmp_path, tied):
    theirs, folder = peft_adapter(tied, tmp_path)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {f"base_model.model.{EMBED}.lora_embedding_A",
            f"base_model.model.{EMBED}.lora_embedding_B"} <= keys
    for model in (llama(tied), twin(llama(tied))):
        load_adapter(model, folder)
        emb = model.get_submodule(EMBED)
        assert isinstance(emb, LoRAEmbedding)
        if tied:  # the head still reads the base table: the update is the lookup's alone
            assert model.lm_head.weight is emb.weight
        torch.testing.assert_close(logits(model, ids()), theirs, rtol=0, atol=1e-5)
    assert (logits(llama(tied), ids()) - theirs).abs().max() > 1e-3  # the adapter counts


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_loads_what_minilora_saves_with_equal_logits(tmp_path, tied):
    ours = twin(llama(tied))
    report = inject_lora(ours, LoraConfig(r=4, alpha=8, targets=TARGETS))
    assert (EMBED, VOCAB, 32) in report.modules
    perturb(ours)
    folder = save_adapter(ours, tmp_path / "a")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor(f"base_model.model.{EMBED}.lora_embedding_A")
        b = f.get_tensor(f"base_model.model.{EMBED}.lora_embedding_B")
    assert a.shape == (4, VOCAB) and b.shape == (32, 4)
    theirs = peft.PeftModel.from_pretrained(llama(tied), str(folder)).eval()
    assert isinstance(theirs.base_model.model.model.embed_tokens, peft.tuners.lora.Embedding)
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), rtol=0, atol=1e-5)
    # and back: minilora reads its own file to the same logits, the fingerprint checked
    again = twin(llama(tied))
    load_adapter(again, folder)
    torch.testing.assert_close(logits(again, ids()), logits(ours, ids()), rtol=0, atol=0)
    with pytest.raises(FingerprintMismatch):
        load_adapter(twin(llama(tied, seed=1)), folder)


def test_the_init_is_peft_s_and_leaves_the_output_as_the_base():
    """PEFT starts an embedding's A at zero and B normal (std 1), whatever the Linear init."""
    model = llama(True)
    base = logits(model, ids())
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens"], init="gaussian"))
    emb = model.get_submodule(EMBED)
    a, b = emb.lora_A["default"].weight, emb.lora_B["default"].weight
    assert torch.equal(a, torch.zeros(4, VOCAB))
    assert 0.7 < b.std().item() < 1.3
    torch.testing.assert_close(logits(model, ids()), base, rtol=0, atol=0)
    theirs = peft.get_peft_model(llama(True), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights="gaussian"))
    peft_emb = theirs.base_model.model.model.embed_tokens
    assert torch.equal(peft_emb.lora_embedding_A["default"], torch.zeros(4, VOCAB))


def test_rslora_scaling_matches_peft(tmp_path):
    theirs, folder = peft_adapter(False, tmp_path, use_rslora=True)
    model = twin(llama(False))
    config = load_adapter(model, folder)
    assert config.use_rslora and model.get_submodule(EMBED).scaling["default"] == 8 / 2
    torch.testing.assert_close(logits(model, ids()), theirs, rtol=0, atol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores_the_table():
    model = twin(llama(False))
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    perturb(model)
    table = model.get_submodule(EMBED).weight.detach().clone()
    unmerged = logits(model, ids())
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids()), unmerged, rtol=0, atol=1e-5)
    with disabled(model):  # merged and disabled: the base table
        torch.testing.assert_close(logits(model, ids()), logits(twin(llama(False)), ids()),
                                   rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert torch.equal(model.get_submodule(EMBED).weight, table)
    base_fingerprint(model)  # unmerged again: the base is held exactly


def test_a_tied_table_merges_into_a_copy_and_the_head_keeps_the_base():
    model = twin(llama(True))
    base_table = model.lm_head.weight.detach().clone()
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    perturb(model)
    adapted = logits(model, ids())
    with pytest.raises(ConfigError, match="another module shares"):
        merge_lora(model)  # in place it would change the tied head too
    merged = merge_and_unload(model)
    assert type(merged.model.embed_tokens) is nn.Embedding
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.lm_head.weight, base_table)
    torch.testing.assert_close(logits(merged, ids()), adapted, rtol=0, atol=1e-5)


def test_fingerprint_covers_the_embedding():
    model = twin(llama(True))
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens"]))
    first = base_fingerprint(model)
    with torch.no_grad():
        model.get_submodule(EMBED).weight[0, 0] += 1.0
    assert base_fingerprint(model) != first


def test_training_moves_the_embedding_lora_and_only_lora():
    model = twin(llama(True))
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    mark_trainable(model)
    emb = model.get_submodule(EMBED)
    assert not emb.weight.requires_grad
    before = {id(p): p.detach().clone() for p in lora_parameters(model)}
    table = emb.weight.detach().clone()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for step in range(3):
        x = ids(10 + step)
        out = model(x)
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    a, b = emb.lora_A["default"].weight, emb.lora_B["default"].weight
    assert (a - before[id(a)]).abs().max() > 1e-3  # A starts at zero and moves first
    assert (b - before[id(b)]).abs().max() > 1e-3
    assert torch.equal(emb.weight, table)


def test_a_mixed_batch_routes_rows_through_the_embedding_too():
    model = twin(llama(True))
    for name, seed in (("a", 3), ("b", 4)):
        inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]), name)
        perturb(model, seed, name)
    x = ids()
    alone = {}
    for name in ("a", "b"):
        set_active(model, [name])
        alone[name] = logits(model, x)
    with mixed_adapters(model, ["b", "a"]):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed[0], alone["b"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone["a"][1], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="LoRA on an embedding"):
        combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA is not supported on an embedding"),
    ({"init": "pissa"}, "the PiSSA init is not supported on an embedding"),
])
def test_variants_an_embedding_does_not_do_are_refused_changing_nothing(changes, message):
    model = twin(llama(True))
    with pytest.raises(ConfigError, match=message):
        inject_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS, **changes))
    assert not lora_modules(model)


def test_a_quantized_table_is_refused():
    table = nn.Embedding(VOCAB, 32)
    table.weight = nn.Parameter(torch.zeros(VOCAB, 32, dtype=torch.uint8), requires_grad=False)
    holder = nn.Module()
    holder.embed_tokens = table
    with pytest.raises(ConfigError, match="its table is quantized"):
        inject_lora(holder, LoraConfig(r=4, alpha=8, targets=["embed_tokens"]))


def test_peft_s_ensure_weight_tying_is_refused(tmp_path):
    """With ensure_weight_tying PEFT gives a tied head the embedding's LoRA too, which
    minilora does not do: such a file is refused, naming the field."""
    _, folder = peft_adapter(True, tmp_path, ensure_weight_tying=True)
    model = llama(True)
    with pytest.raises(AdapterError, match="field 'ensure_weight_tying' is true"):
        load_adapter(model, folder)
    assert not lora_modules(model)


def test_minimind_s_format_refuses_an_embedding_lora(tmp_path):
    """MiniMind's apply_lora adapts Linear layers only: the file would drop the embedding's."""
    model = twin(llama(True))
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    with pytest.raises(AdapterError, match="would drop the embedding's"):
        save_adapter(model, tmp_path / "a.pth", format="minimind")
    assert not (tmp_path / "a.pth").exists()


def test_a_peft_dora_adapter_on_the_embedding_is_refused_leaving_the_model_as_it_was(tmp_path):
    """PEFT has DoRA on an embedding; minilora does not: refused by name, nothing injected."""
    _, folder = peft_adapter(False, tmp_path, use_dora=True)
    model = twin(llama(False))
    base = logits(model, ids())
    with pytest.raises(AdapterError, match="DoRA is not supported on an embedding"):
        load_adapter(model, folder)
    assert not lora_modules(model)
    torch.testing.assert_close(logits(model, ids()), base, rtol=0, atol=0)
