"""QLoRA: LoRA over a bitsandbytes NF4 / int8 base on the CPU, against the dequantized base."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from helpers import chat_rows, fit, tiny_model, tiny_tokenizer, write_jsonl
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.cli import main
from minilora.core.errors import CheckpointError, ConfigError, FingerprintMismatch, MissingExtra
from minilora.lora.fingerprint import base_fingerprint
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable, merge_lora
from minilora.lora.layer import LoraConfig, LoRALinear
from minilora.training.loop import TrainConfig

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")

from minilora.lora.qlora import quantize_model  # noqa: E402
from minilora.lora.quantized_weight import QuantizedLinear, dequantize, is_quantized  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def lora_model(seed: int = 0, targets: object = ("q_proj", "v_proj", "down_proj")):
    model = tiny_model(VOCAB, hidden=64, seed=seed)
    targets = list(targets) if isinstance(targets, tuple) else targets
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
    mark_trainable(model)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    return model


def dequantized_copy(quantized: torch.nn.Module, original: torch.nn.Module) -> torch.nn.Module:
    """``original`` with every weight quantize_model replaced set to its dequantized values."""
    reference = copy.deepcopy(original)
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in quantized.named_parameters():
            if is_quantized(p):
                weights[name].copy_(dequantize(p))
    return reference


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out, [p.grad.clone() for p in lora_parameters(model)]


def test_lora_on_an_nf4_base_equals_lora_on_the_dequantized_base():
    model = lora_model()
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, "nf4")
    # LoRA layers and the plain Linears (up/gate/k/o) are quantized; the tied head is not
    assert "model.layers.0.self_attn.q_proj" in report.modules
    assert "model.layers.0.mlp.up_proj" in report.modules
    assert isinstance(quantized.model.layers[0].mlp.up_proj, QuantizedLinear)
    assert not is_quantized(quantized.lm_head.weight)
    assert report.bytes_after < report.bytes_before / 3
    reference = dequantized_copy(quantized, model)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert rel_err(quantized(ids).logits, reference(ids).logits) <= 1e-4
        # and the quantization did change the base: the test compares something
        assert rel_err(reference(ids).logits, model(ids).logits) > 1e-4
    out_q, grads_q = grads(quantized, ids)
    out_r, grads_r = grads(reference, ids)
    assert rel_err(out_q.loss, out_r.loss) <= 1e-4
    for g, r in zip(grads_q, grads_r, strict=True):
        assert rel_err(g, r) <= 1e-3
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora_parameters(quantized))


def test_an_nf4_base_under_bf16_autocast_trains_in_bf16():
    quantized = lora_model()
    quantize_model(quantized, "nf4")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantized(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in lora_parameters(quantized))


def test_lora_on_an_int8_base_equals_bitsandbytes_int8_plus_the_update():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    reference = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
    reference.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    reference.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    reference = reference.to("cpu")
    holder = torch.nn.Sequential(LoRALinear(linear, r=4, alpha=8))
    lora = holder[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.05)
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(False)
    quantize_model(holder, "int8")
    assert is_quantized(lora.weight)
    x = torch.randn(3, 5, 64)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    expected = reference(x) + lora.scaling["default"] * (x @ a.t()) @ b.t()
    assert rel_err(lora(x), expected) <= 1e-5


def test_a_qlora_adapter_is_plain_and_carries_the_full_precision_fingerprint(tmp_path):
    model = lora_model()
    full_fingerprint = base_fingerprint(model)
    quantize_model(model, "nf4")
    assert base_fingerprint(model) == full_fingerprint
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # onto its full-precision base: accepted, and the same LoRA values
    base = tiny_model(VOCAB, hidden=64, seed=0)
    inject_lora(base, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    load_adapter(base, tmp_path / "adapter")
    for p, q in zip(lora_parameters(base), lora_parameters(model), strict=True):
        assert torch.equal(p, q)
    # onto another base: refused
    other = tiny_model(VOCAB, hidden=64, seed=1)
    with pytest.raises(FingerprintMismatch):
        load_adapter(other, tmp_path / "adapter")


def test_merging_into_a_quantized_base_is_refused():
    model = lora_model()
    quantize_model(model, "nf4")
    weight = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ConfigError, match="full-precision base"):
        merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # nothing changed


def test_quantize_refuses_trainable_weights_and_unknown_kinds():
    model = tiny_model(VOCAB, hidden=64)
    with pytest.raises(ConfigError, match="trainable"):
        quantize_model(model, "nf4")  # nothing frozen
    with pytest.raises(ConfigError, match="expected one of"):
        quantize_model(model, "fp3")
    assert not any(is_quantized(p) for p in model.parameters())


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_qlora_training_runs_and_resume_refuses_another_quantize(tok, tmp_path):
    data = str(write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4)))
    base = dict(data=data, out_dir=str(tmp_path / "run"), lora_r=4, batch_size=4, lr=1e-2,
                max_seq_len=64, amp_dtype="float32", seed=0, max_steps=4)
    part = fit(tiny_model(tok.vocab_size), tok,
                 TrainConfig(quantize="nf4", stop_after=2, activation_checkpointing=True, **base))
    assert part.steps == 2
    with pytest.raises(CheckpointError, match="quantize: 'nf4' in the checkpoint, None now"):
        fit(tiny_model(tok.vocab_size), tok, TrainConfig(resume=True, **base))
    done = fit(tiny_model(tok.vocab_size), tok,
                 TrainConfig(quantize="nf4", resume=True, activation_checkpointing=True, **base))
    assert done.steps == 4 and all(torch.isfinite(torch.tensor(x)) for _, x in done.losses)
    # the adapter loads onto the full-precision base it was quantized from
    full = tiny_model(tok.vocab_size)
    inject_lora(full, LoraConfig(r=4, alpha=16.0))
    load_adapter(full, done.output_dir)


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "nf4", "--full"], "cannot go with --full (which trains every weight)"),
    (["--quantize", "nf2"], "expected one of ('nf4', 'int8')"),
])
def test_bad_quantize_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_without_bitsandbytes_quantize_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    with pytest.raises(MissingExtra, match=r"\[qlora\]"):
        quantize_model(lora_model(), "nf4")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4))
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--quantize", "nf4", "--max-steps", "1"])
    err = capsys.readouterr().err
    # this test runs in a clone: the hint installs into it, not minilora again from PyPI
    root = Path(__file__).resolve().parents[2]
    assert code == 2 and f"pip install -e '.[qlora]' (in {root})" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "adapter").exists()


def test_our_qlora_equals_peft_qlora_on_the_same_quantized_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minilora.model.io import save_model

    model = tiny_model(VOCAB, hidden=64)
    save_model(model, tmp_path / "base")
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    mark_trainable(model)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)
    quantize_model(model, "nf4")
    save_adapter(model, tmp_path / "adapter")
    # transformers' own layout for a 4-bit model: bitsandbytes Linear4bit layers, here holding
    # the very quantized weights ours hold, then PEFT's QLoRA layers over them
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                           dtype=torch.float32)
    for name, p in model.named_parameters():
        if is_quantized(p):
            path = name.rsplit(".", 1)[0]
            old = hf.get_submodule(path)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False,
                                    compute_dtype=torch.float32, quant_type="nf4", device="meta")
            new.weight = p
            parent, _, child = path.rpartition(".")
            setattr(hf.get_submodule(parent), child, new)
    hf.is_loaded_in_4bit = True  # PEFT then wraps the layers with its bitsandbytes LoRA
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj,
                      peft.tuners.lora.bnb.Linear4bit)
    # Training mode on both: in eval mode on an AVX512-BF16 CPU, bitsandbytes' Linear4bit
    # repacks its weight for a bf16 kernel in place, and the weights are shared here.
    peft_model.train()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_model(ids).logits) <= 1e-5


def test_an_evaluation_between_steps_leaves_the_gradients_as_they_were():
    # bitsandbytes' own Linear4bit repacks its weight in eval mode on AVX512-BF16 CPUs and then
    # passes no gradient; train() evaluates between steps, so this must hold.
    model = lora_model()
    quantize_model(model, "nf4")
    ids = torch.randint(0, VOCAB, (2, 12))
    _, before = grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    _, after = grads(model, ids)
    for a, b in zip(after, before, strict=True):
        assert rel_err(a, b) <= 1e-6


def test_a_dora_layer_is_not_quantized():
    model = tiny_model(VOCAB, hidden=64)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj"], use_dora=True))
    mark_trainable(model)
    with pytest.raises(ConfigError, match="DoRA adapter needs the full-precision"):
        quantize_model(model, "nf4")
    assert not any(is_quantized(p) for p in model.parameters())
