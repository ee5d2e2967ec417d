"""DoRA and PiSSA (issue 13 item 7): files PEFT saves load into minilora with PeftModel's
logits, minilora's DoRA loads into PEFT, DoRA merges and trains, PiSSA starts where the base
was. References are PEFT and transformers on the same weights, or the formula written out."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from torch import nn

from minilora.adapters.folder import load_adapter, save_adapter
from minilora.core.errors import AdapterError, ConfigError
from minilora.lora.injection import (
    inject_lora,
    lora_parameters,
    mark_trainable,
    merge_lora,
    unmerge_lora,
)
from minilora.lora.layer import LoraConfig, LoRALinear, lora_modules
from minilora.model.io import load_model

torch.set_num_threads(1)

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def hf_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = getattr(transformers, FAMILIES[family])(**SMALL, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def perturb_peft(model: nn.Module, seed: int = 3) -> None:
    """B away from zero and m away from ||W||, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def perturb_ours(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for name in m.lora_A:
                b = m.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
                if name in m.lora_magnitude_vector:
                    mag = m.lora_magnitude_vector[name]
                    mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_dora_adapter_loads_with_peftmodels_logits(tmp_path: Path, family: str):
    """PEFT builds a DoRA adapter on a transformers model and saves it with the base; minilora
    loads both: logits equal PeftModel's."""
    hf = hf_model(family)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_dora=True)
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(hf, config).eval()
    perturb_peft(peft_model)
    x = ids()
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["init_lora_weights"] is True

    ours = load_model(tmp_path / "base")
    loaded = load_adapter(ours, tmp_path / "adapter")
    assert loaded.use_dora and loaded.init == "kaiming"
    assert rel_err(logits(ours, x), want) <= 1e-5
    assert rel_err(logits(ours, x), logits(load_model(tmp_path / "base"), x)) > 1e-3


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_peft_adapter_whose_init_rewrote_the_base_is_refused(tmp_path: Path, init: str):
    """PEFT saves A and B of an init that rewrote the base weights, and its from_pretrained
    repeats that init on the base it is given: on the original base it rebuilds the trained
    model (checked here against the model PEFT trained). The file does not hold the rewritten
    base, so minilora, which would add B A to the base as it is, refuses naming the field."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=init)
    peft_model = peft.get_peft_model(hf, config).eval()
    perturb_peft(peft_model)
    x = ids()
    want = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "init_lora_weights"] == init
    if init == "pissa":  # full SVD: deterministic, so PEFT's reload reproduces the model
        again = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
            str(tmp_path / "adapter")).eval()
        assert rel_err(logits(again, x), want) <= 1e-4
    ours = load_model(tmp_path / "base")
    with pytest.raises(AdapterError, match=f"field 'init_lora_weights' is '{init}': that "
                       "initialisation rewrote the base weights"):
        load_adapter(ours, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())  # the model untouched


def minilora_dora(targets: list[str] | str = ("q_proj", "v_proj", "o_proj")) -> nn.Module:
    """minilora's Llama (transformers' weights) with a perturbed DoRA adapter."""
    ours = load_model_from_hf(hf_model("llama"))
    inject_lora(ours, LoraConfig(r=4, alpha=8, targets=targets if isinstance(targets, str)
                                 else list(targets), use_dora=True))
    perturb_ours(ours)
    return ours


def load_model_from_hf(hf: nn.Module) -> nn.Module:
    from minilora.model.decoder import CausalLM, ModelConfig

    ours = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    return ours


def test_minilora_dora_adapter_loads_into_peft(tmp_path: Path):
    ours = minilora_dora()
    x = ids()
    folder = save_adapter(ours, tmp_path / "dora")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(hf_model("llama"), str(folder)).eval()
    assert rel_err(logits(peft_model, x), logits(ours, x)) <= 1e-5
    # and back: minilora reads its own DoRA file to the same logits
    again = load_model_from_hf(hf_model("llama"))
    load_adapter(again, folder)
    assert rel_err(logits(again, x), logits(ours, x)) <= 1e-6


def test_minimind_format_refuses_dora(tmp_path: Path):
    with pytest.raises(AdapterError, match="no place for DoRA"):
        save_adapter(minilora_dora(["q_proj"]), tmp_path / "x.pth", format="minimind")
    assert not (tmp_path / "x.pth").exists()


def test_dora_layer_equals_the_papers_formula():
    """W' = m * (W + s B A) / ||W + s B A||_row, written out here (Liu et al. 2024, eq. 5)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lin = LoRALinear(base, r=3, alpha=6.0, use_dora=True)
    w0 = base.weight.detach().clone()
    torch.testing.assert_close(lin.lora_magnitude_vector["default"].detach(),
                               torch.linalg.norm(w0, dim=1))  # m starts at ||W||: output unchanged
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        lin.lora_magnitude_vector["default"].mul_(1.5)
    a, b = lin.lora_A["default"].weight.detach(), lin.lora_B["default"].weight.detach()
    m = lin.lora_magnitude_vector["default"].detach()
    v = w0 + 2.0 * b @ a
    w = m[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
    x = torch.randn(4, 5, 12)
    torch.testing.assert_close(lin(x), x @ w.T + base.bias)
    lin.merge()
    torch.testing.assert_close(lin.weight.detach(), w)
    torch.testing.assert_close(lin(x), x @ w.T + base.bias)


def test_dora_merge_equals_unmerged_and_unmerge_restores_the_base():
    ours = minilora_dora()
    x = ids()
    before = logits(ours, x)
    weights = [m.weight.detach().clone() for _, m in lora_modules(ours)]
    merge_lora(ours)
    assert rel_err(logits(ours, x), before) <= 1e-5
    unmerge_lora(ours)
    assert all(torch.equal(m.weight, w) for (_, m), w in zip(lora_modules(ours), weights,
                                                            strict=True))
    torch.testing.assert_close(logits(ours, x), before)


def test_dora_trains_its_magnitude_too_and_the_loss_falls():
    ours = minilora_dora("all-linear")
    mark_trainable(ours)
    params = lora_parameters(ours)
    mags = [p for _, m in lora_modules(ours) for p in m.lora_magnitude_vector.values()]
    assert mags and all(any(p is q for q in params) for p in mags)
    start = [p.detach().clone() for p in mags]
    task = torch.arange(12).repeat(2, 1) % VOCAB
    opt = torch.optim.AdamW(params, lr=5e-2)
    ours.train()
    losses = []
    for _ in range(8):
        loss = ours(task, labels=task).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.92 * losses[0], losses
    assert all(not torch.equal(p, p0) for p, p0 in zip(mags, start, strict=True))


def test_pissa_init_takes_the_top_singular_directions_and_keeps_the_output():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 16)
    before = base(x).detach()
    lin = LoRALinear(base, r=4, alpha=8.0, init="pissa")  # scaling 2
    a, b = lin.lora_A["default"].weight.detach(), lin.lora_B["default"].weight.detach()
    u, s, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(2.0 * b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.detach(), w0 - 2.0 * b @ a)  # the residual
    torch.testing.assert_close(lin(x), before, atol=1e-5, rtol=1e-5)
    assert lin.init["default"] == "pissa"


def test_pissa_adapter_saved_unconverted_records_its_init_and_is_refused(tmp_path: Path):
    """save_adapter without pissa_initial writes A and B as they are, with init "pissa" (PEFT's
    own unconverted save); reading such a folder back is refused, as PEFT's are (the converted
    save, test_pissa_saved_as_plain_lora_for_the_original_base, is what loads)."""
    hf = hf_model("llama")
    ours = load_model_from_hf(hf)
    x = ids()
    before = logits(ours, x)
    inject_lora(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    assert rel_err(logits(ours, x), before) <= 1e-5  # PiSSA starts where the base was
    perturb_ours(ours)
    folder = save_adapter(ours, tmp_path / "pissa")
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    with pytest.raises(AdapterError, match="field 'init_lora_weights' is 'pissa'"):
        load_adapter(load_model_from_hf(hf), folder)


def test_combining_dora_adapters_takes_svd_of_their_merged_updates():
    """A linear concatenation of B and A would drop DoRA's magnitude: refused; "svd" factors
    each layer's merged update (full rank in general: at r = min(in, out) it is exact)."""
    from minilora.lora.named import combine_adapters

    ours = minilora_dora(["q_proj"])
    x = ids()
    want = logits(ours, x)
    with pytest.raises(ConfigError, match="method='svd'"):
        combine_adapters(ours, {"default": 1.0}, "both")
    report = combine_adapters(ours, {"default": 1.0}, "both", method="svd", r=32)
    assert report.max_error < 1e-5
    assert rel_err(logits(ours, x), want) <= 1e-4


def test_pissa_saved_as_plain_lora_for_the_original_base(tmp_path: Path):
    """save_adapter(..., pissa_initial=the folder saved before training) writes a rank-2r
    LoRA for the original model, as PEFT's path_initial_model_for_weight_conversion does:
    minilora (fingerprint checked) and PEFT load it onto the original with the trained logits."""
    ours = load_model_from_hf(hf_model("llama"))
    inject_lora(ours, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    start = save_adapter(ours, tmp_path / "start")
    perturb_ours(ours)
    x = ids()
    folder = save_adapter(ours, tmp_path / "plain", pissa_initial=start)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    original = load_model_from_hf(hf_model("llama"))
    load_adapter(original, folder)  # the fingerprint is the original base's
    assert rel_err(logits(original, x), logits(ours, x)) <= 1e-5
    peft_model = peft.PeftModel.from_pretrained(hf_model("llama"), str(folder)).eval()
    assert rel_err(logits(peft_model, x), logits(ours, x)) <= 1e-5
    with pytest.raises(AdapterError, match="not a PiSSA"):
        save_adapter(minilora_dora(["q_proj"]), tmp_path / "no", pissa_initial=start)
