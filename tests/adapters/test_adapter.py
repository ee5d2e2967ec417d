"""Tests for adapters/folder.py: PEFT folders (checked with PEFT itself), MiniMind .pth (checked
with the seed's own apply_lora/save_lora/load_lora), fingerprints and strict errors."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers import minilora_twin
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.adapters.state import adapter_state_dict, load_adapter_state_dict
from minilora.core.errors import AdapterError
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable, merge_lora
from minilora.lora.layer import LoraConfig, lora_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def llama(seed: int = 0) -> nn.Module:
    """A tiny LlamaForCausalLM: hidden 32, 4 heads, 2 kv heads (q/o square, k/v 32 -> 16)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def perturb_b(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def train_a_few_steps(model: nn.Module, steps: int = 3) -> None:
    mark_trainable(model)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for step in range(steps):
        x = ids(10 + step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def adapted(config: LoraConfig, seed: int = 0) -> nn.Module:
    model = llama(seed)
    inject_lora(model, config)
    perturb_b(model)
    return model


# ---------------------------------------------------------------- round trip and layout


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = adapted(LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    x = ids()
    expected = logits(model, x)
    folder = save_adapter(model, tmp_path / "adapter")
    fresh = llama()
    config = load_adapter(fresh, folder)
    assert torch.equal(logits(fresh, x), expected)
    assert config == LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    assert {n for n, _ in lora_modules(fresh)} == {n for n, _ in lora_modules(model)}


def test_folder_layout_metadata_and_config(tmp_path):
    config = LoraConfig(r=4, alpha=8, targets="square", exclude=["layers.1.self_attn.o_proj"])
    model = adapted(config)
    folder = save_adapter(model, tmp_path / "a", base_model_name_or_path="org/tiny")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert meta["format"] == "pt"
    assert meta["minilora_base_fingerprint"] == base_fingerprint(model)
    assert meta["minilora_version"]
    assert keys == set(adapter_state_dict(model))
    assert len(keys) == 2 * 3  # q_proj of both layers, o_proj of layer 0
    assert a.shape == (4, 32) and b.shape == (32, 4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["bias"], cfg["use_dora"]) == (4, 8, "none", False)
    assert cfg["base_model_name_or_path"] == "org/tiny"
    # "square" minus the excluded layer, as the exact layers (last names would take it too)
    assert cfg["target_modules"] == ["model.layers.0.self_attn.o_proj",
                                     "model.layers.0.self_attn.q_proj",
                                     "model.layers.1.self_attn.q_proj"]
    assert cfg["exclude_modules"] is None
    assert cfg["init_lora_weights"] == "gaussian"
    assert not any(k.startswith("minilora") for k in cfg)


def test_save_casts_dtype(tmp_path):
    model = adapted(LoraConfig(r=4, targets=["q_proj"]))
    x = ids()
    folder = save_adapter(model, tmp_path / "a", dtype=torch.bfloat16)
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    fresh = llama()
    load_adapter(fresh, folder)
    assert rel_err(logits(fresh, x), logits(model, x)) < 1e-2


def test_load_into_model_with_other_scaling_rescales_b(tmp_path):
    model = adapted(LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    x = ids()
    folder = save_adapter(model, tmp_path / "a")
    other = llama()
    inject_lora(other, LoraConfig(r=4, alpha=32, targets=["q_proj"]))
    load_adapter(other, folder)
    assert rel_err(logits(other, x), logits(model, x)) <= 1e-6


def test_state_dict_round_trip_and_strict_errors():
    model = adapted(LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    sd = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    other = llama()
    inject_lora(other, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    load_adapter_state_dict(other, sd)
    assert all(torch.equal(v, adapter_state_dict(other)[k]) for k, v in sd.items())

    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    bad = dict(sd)
    del bad[f"{q0}.lora_A.weight"]
    bad["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    bad[f"{q0}.lora_B.weight"] = torch.zeros(32, 5)
    with pytest.raises(AdapterError) as err:
        load_adapter_state_dict(other, bad)
    msg = str(err.value)
    assert f"missing keys ['{q0}.lora_A.weight']" in msg
    assert "unexpected keys ['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight']" in msg
    assert f"{q0}.lora_B.weight: file (32, 5), model (32, 4)" in msg


# ---------------------------------------------------------------- PEFT interop


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]),
        LoraConfig(r=4, alpha=8, targets="all-linear", init="kaiming"),
        LoraConfig(r=4, alpha=4, targets=r".*\.(k|o)_proj", exclude=r".*0\.self_attn\.o_proj"),
        LoraConfig(r=8, alpha=16, targets="square", use_rslora=True),
        LoraConfig(r=2, alpha=8, dropout=0.1, targets=["mlp.down_proj", "1.self_attn.q_proj"]),
    ],
    ids=["q,v", "all-linear", "regex+exclude", "square+rslora", "paths+dropout"],
)
def test_peft_loads_minilora_adapter(tmp_path, config):
    model = llama()
    inject_lora(model, config)
    train_a_few_steps(model)
    x = ids()
    ours = logits(model, x)
    folder = save_adapter(model, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(llama(), str(folder)).eval()
    theirs = logits(peft_model, x)
    assert rel_err(theirs, ours) <= 1e-5
    assert rel_err(ours, logits(llama(), x)) > 1e-4  # training moved the output
    peft_targets = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert peft_targets == {n for n, _ in lora_modules(model)}


def test_minilora_loads_peft_adapter(tmp_path):
    base = llama()
    peft_config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(base, peft_config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT's B starts at zero: give it values
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = ids()
    theirs = logits(peft_model, x)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = llama()
    config = load_adapter(model, tmp_path / "peft")
    assert rel_err(logits(model, x), theirs) <= 1e-5
    assert (config.r, config.alpha, config.init) == (8, 16.0, "kaiming")
    assert sorted(config.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(lora_modules(model)) == 4 * 2


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_mismatch_is_refused_unless_overridden(tmp_path):
    model = adapted(LoraConfig(r=4, targets=["q_proj"]), seed=0)
    folder = save_adapter(model, tmp_path / "a")
    other = llama(seed=1)  # same architecture, other weights
    with pytest.raises(AdapterError, match="another base model.*check_fingerprint=False"):
        load_adapter(other, folder)
    assert not lora_modules(other)  # the injection of the failed load is undone
    load_adapter(other, folder, check_fingerprint=False)
    loaded, saved = adapter_state_dict(other), adapter_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_verified_fingerprint_is_not_hashed_again_another_still_is(tmp_path, monkeypatch):
    """What the server keeps for evicted adapters read back: a fingerprint once found equal to
    the base's is trusted again; an adapter of another base is still refused."""
    from minilora.adapters import folder as folder_module

    mine = save_adapter(adapted(LoraConfig(r=4, targets=["q_proj"]), seed=0), tmp_path / "a")
    theirs = save_adapter(adapted(LoraConfig(r=4, targets=["q_proj"]), seed=1),
                          tmp_path / "b")  # trained on another base
    served = llama(seed=0)
    verified: set[str] = set()
    load_adapter(served, mine, name="a", verified=verified)
    assert verified == {base_fingerprint(served, "a")}
    hashed = []
    real = folder_module.base_fingerprint
    monkeypatch.setattr(folder_module, "base_fingerprint",
                        lambda *a, **k: hashed.append(1) or real(*a, **k))
    load_adapter(served, mine, name="again", verified=verified)
    assert hashed == []  # the same recorded fingerprint: not hashed again
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(served, theirs, name="b", verified=verified)
    assert hashed == [1] and len(verified) == 1
    assert "b" not in {n for _, m in lora_modules(served) for n in m.lora_A}


def test_fingerprint_ignores_dtype_and_requires_unmerged(tmp_path):
    model = adapted(LoraConfig(r=4, targets=["q_proj"]))
    fp = base_fingerprint(model)
    assert fp.startswith("sha256:")
    bf16 = llama().to(torch.bfloat16)
    inject_lora(bf16, LoraConfig(r=4, targets=["q_proj"]))
    assert base_fingerprint(bf16) == fp
    assert base_fingerprint(adapted(LoraConfig(r=4, targets=["q_proj"]), seed=1)) != fp
    merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge_lora"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="merged.*unmerge_lora"):
        load_adapter_state_dict(model, adapter_state_dict(model))


# ---------------------------------------------------------------- MiniMind .pth


class SeedLoRA(nn.Module):
    """MiniMind's LoRA module, as the seed shows it."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.A.weight.data.normal_(mean=0.0, std=0.02)
        self.B.weight.data.zero_()

    def forward(self, x):
        return self.B(self.A(x))


def seed_apply_lora(model, rank=8):
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.shape[0] == module.weight.shape[1]:
            lora = SeedLoRA(module.weight.shape[0], module.weight.shape[1], rank=rank)
            module.lora = lora
            original_forward = module.forward

            def forward_with_lora(x, layer1=original_forward, layer2=lora):
                return layer1(x) + layer2(x)

            module.forward = forward_with_lora


def seed_save_lora(model, path):
    state_dict = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora"):
            state_dict.update({f"{name}.lora.{k}": v for k, v in module.lora.state_dict().items()})
    torch.save(state_dict, path)


def seed_load_lora(model, path):
    state_dict = torch.load(path, map_location="cpu")
    for name, module in model.named_modules():
        if hasattr(module, "lora"):
            lora_state = {
                k.replace(f"{name}.lora.", ""): v for k, v in state_dict.items()
                if f"{name}.lora." in k
            }
            module.lora.load_state_dict(lora_state)


def test_minimind_export_loads_in_minimind(tmp_path):
    model = adapted(LoraConfig(r=8, alpha=16, targets="square"))  # scaling 2, folded into B
    x = ids()
    path = save_adapter(model, tmp_path / "lora_identity.pth", format="minimind")
    mm = llama()
    seed_apply_lora(mm, rank=8)
    seed_load_lora(mm, path)
    assert rel_err(logits(mm, x), logits(model, x)) <= 1e-6


def test_minimind_file_loads_into_minilora(tmp_path):
    mm = llama()
    seed_apply_lora(mm, rank=8)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in mm.modules():
            if isinstance(m, SeedLoRA):
                m.B.weight.copy_(torch.randn(m.B.weight.shape, generator=gen) * 0.1)
    path = tmp_path / "lora_identity_32.pth"
    seed_save_lora(mm, path)
    model = llama()
    config = load_adapter(model, path)
    assert rel_err(logits(model, ids()), logits(mm, ids())) <= 1e-6
    assert (config.r, config.alpha, config.scaling) == (8, 8.0, 1.0)
    assert config.targets == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("o_proj", "q_proj")
    )
    # and back out through a PEFT folder, which PEFT reads the same
    folder = save_adapter(model, tmp_path / "converted")
    peft_model = peft.PeftModel.from_pretrained(llama(), str(folder)).eval()
    assert rel_err(logits(peft_model, ids()), logits(mm, ids())) <= 1e-5


def test_minimind_export_refuses_non_square(tmp_path):
    model = adapted(LoraConfig(r=4, targets=["k_proj"]))
    with pytest.raises(AdapterError, match=r"square layers only.*k_proj \(32 -> 16\)"):
        save_adapter(model, tmp_path / "x.pth", format="minimind")


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle ever runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pth_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lora.pth"
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(8, 32),
                "payload": Payload(str(marker))}, path)
    assert not marker.exists()
    model = llama()
    with pytest.raises(AdapterError, match="weights_only=True"):
        load_adapter(model, path)
    assert not marker.exists()
    assert not lora_modules(model)


# ---------------------------------------------------------------- errors on disk


def _saved(tmp_path):
    model = adapted(LoraConfig(r=4, targets=["q_proj"]))
    return save_adapter(model, tmp_path / "a")


def _config_edit(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg))
    return edit


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "adapter_config.json").unlink(), r"missing .*adapter_config\.json"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), r"missing .*adapter_model"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
         "not a readable safetensors file"),
        (_truncate, "not a readable safetensors file"),
        (lambda f: (f / "adapter_config.json").write_text('{\n"r": 4,\n oops}'),
         r"adapter_config\.json: line 3: not valid JSON"),
        # a plain LoRA file called DoRA lacks the magnitude vectors
        (_config_edit(use_dora=True), r"missing keys \[.*lora_magnitude_vector"),
        (_config_edit(peft_type="IA3"), "field 'peft_type'"),
        (_config_edit(init_lora_weights="olora"), "rewrote the base weights"),
        (_config_edit(r=0), "field 'r' must be an integer >= 1"),
        (_config_edit(r=2), r"mis-shaped keys"),
        (_config_edit(target_modules=["k_proj"]), r"missing keys.*unexpected keys"),
        (_config_edit(target_modules=["nothing"]), r"cannot apply.*match no Linear"),
        (lambda f: save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)},
                             str(f / "adapter_model.safetensors")), "unexpected keys"),
    ],
    ids=["no-config", "no-weights", "garbage", "truncated", "bad-json", "dora", "ia3", "olora",
         "r0", "r-mismatch", "keys", "no-match", "foreign-keys"],
)
def test_load_errors(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    model = llama()
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder)
    assert not lora_modules(model)


def test_missing_path_and_bad_minimind_keys(tmp_path):
    with pytest.raises(AdapterError, match="no adapter at"):
        load_adapter(llama(), tmp_path / "nowhere")
    path = tmp_path / "odd.pth"
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, path)
    with pytest.raises(AdapterError, match=r"unexpected keys \['model\.layers\.0"):
        load_adapter(llama(), path)
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(8, 32)}, path)
    with pytest.raises(AdapterError, match=r"missing keys .*q_proj\.lora\.B\.weight"):
        load_adapter(llama(), path)


# ---------------------------------------------------------------- minilora's own model -> PEFT


TARGET_FORMS = {
    "suffixes": LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    # on the transformers model this regex also matches mlp.act_fn, which PEFT cannot adapt
    "regex": LoraConfig(r=4, alpha=8, targets=r".*mlp\..*"),
    "all-linear": LoraConfig(r=4, alpha=8, targets="all-linear"),
    "square": LoraConfig(r=4, alpha=8, targets="square"),
    "suffixes+exclude": LoraConfig(r=4, alpha=8, targets=["q_proj", "o_proj", "down_proj"],
                                   exclude=["layers.1.self_attn.o_proj"]),
    "regex+exclude": LoraConfig(r=4, alpha=8, targets=r".*self_attn\..*",
                                exclude=r".*0\.self_attn\.k_proj"),
}


@pytest.mark.parametrize("config", TARGET_FORMS.values(), ids=TARGET_FORMS.keys())
def test_peft_loads_what_minilora_saves_from_its_own_model(tmp_path, config):
    ours = minilora_twin(llama())
    inject_lora(ours, config)
    perturb_b(ours)
    x = ids()
    folder = save_adapter(ours, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(llama(), str(folder)).eval()
    assert rel_err(logits(peft_model, x), logits(ours, x)) <= 1e-5
    assert rel_err(logits(ours, x), logits(llama(), x)) > 1e-4  # the adapter changes the output
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_targets == {n for n, _ in lora_modules(ours)}


def untied(kind: str, seed: int = 0) -> nn.Module:
    """A tiny transformers Llama or Qwen2 with its own lm_head."""
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[kind]
    config = getattr(transformers, cls + "Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return getattr(transformers, cls + "ForCausalLM")(config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_peft_adapter_on_lm_head_loads_with_equal_logits(tmp_path, kind):
    peft_model = peft.get_peft_model(untied(kind), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = ids()
    theirs = logits(peft_model, x)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(str(tmp_path / "peft"))
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in set(f.keys())
    for model in (untied(kind), minilora_twin(untied(kind))):
        load_adapter(model, tmp_path / "peft")
        assert "lm_head" in {n for n, _ in lora_modules(model)}
        assert rel_err(logits(model, x), theirs) <= 1e-5
    # a base whose head differs from the one PEFT saved would compute something else: refused
    other = untied(kind, seed=1)
    with pytest.raises(AdapterError, match=r"lm_head\.base_layer\.weight \(differs from this "
                                           r"model's lm_head\.weight"):
        load_adapter(other, tmp_path / "peft")
    assert not lora_modules(other)


def test_kasa_adapter_is_refused_naming_the_field(tmp_path):
    kasa = peft.get_peft_model(llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], kasa_config=peft.tuners.lora.KasaConfig()))
    kasa.save_pretrained(str(tmp_path / "kasa"))
    model = llama()
    with pytest.raises(AdapterError, match="field 'kasa_config'"):
        load_adapter(model, tmp_path / "kasa")
    assert not lora_modules(model)
def test_a_save_replaces_the_folder_whole_keeping_named_adapters_refusing_other_files(tmp_path):
    """save_adapter swaps in a new folder: the named adapters of PEFT's layout (subfolders) come
    along, files of the old adapter that the new one lacks do not, and a folder holding anything
    else is refused with nothing written."""
    from helpers import tiny_model
    from minilora.core.errors import AdapterError

    model = tiny_model(50)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"]), name="b")
    folder = tmp_path / "x"
    save_adapter(model, folder, name="default")
    save_adapter(model, folder / "b", name="b")
    before = (folder / "b" / "adapter_model.safetensors").read_bytes()
    save_adapter(model, folder, name="default")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "b"]
    assert (folder / "b" / "adapter_model.safetensors").read_bytes() == before
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match=r"holds more than an adapter \(notes\.txt\)"):
        save_adapter(model, folder, name="default")
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_adapter_names_import_from_adapter_as_before():
    """The split files' public names still import from adapters/folder.py, as the same objects."""
    import minilora
    from minilora.adapters import folder as adapter
    from minilora.adapters import peft as peft_format
    from minilora.adapters import state as adapter_state
    from minilora.core import errors
    from minilora.lora import fingerprint

    for name, home in [("save_adapter", adapter), ("load_adapter", adapter),
                       ("adapter_state_dict", adapter_state),
                       ("load_adapter_state_dict", adapter_state),
                       ("base_fingerprint", fingerprint), ("find_adapters", peft_format),
                       ("AdapterError", errors)]:
        assert getattr(adapter, name) is getattr(home, name), name
        assert getattr(minilora, name) is getattr(home, name), name


# Bottom up: each file may import those before it, never one after it.
_LAYERS = [
    ["lora.config", "lora.layer", "lora.named", "lora.injection", "adapters.peft",
     "adapters.state", "lora.fingerprint", "adapters.minimind", "adapters.folder", "lora.qlora"],
    ["model.state_files", "model.config_source", "model.io"],
]


@pytest.mark.parametrize("layers", _LAYERS, ids=lambda layers: layers[-1])
def test_the_split_files_import_downward(layers):
    import ast
    from pathlib import Path

    import minilora

    root = Path(minilora.__file__).parent
    for i, module in enumerate(layers):
        tree = ast.parse((root / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
        imported = {node.module.removeprefix("minilora.") for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        above = imported & set(layers[i + 1:])
        assert not above, f"minilora.{module} imports {sorted(above)}, which sit above it"
