"""Memory: activation checkpointing, the chunked head + loss, and their exactness (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from helpers import chat_rows, fit, tiny_model, tiny_tokenizer, write_jsonl
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig
from minilora.model import loss as loss_module
from minilora.model.decoder import CausalLM, ModelConfig
from minilora.model.io import load_model
from minilora.model.loss import linear_cross_entropy
from minilora.training.loop import TrainConfig
from minilora.training.memory import estimate_memory

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def moe_model(vocab: int) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(model_type="minimind", vocab_size=vocab, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, use_moe=True, num_experts=4,
                         num_experts_per_tok=2, n_shared_experts=1, router_aux_loss_coef=0.1)
    return CausalLM(config)


def lora_grads(model: CausalLM, ids: torch.Tensor, labels: torch.Tensor, *, checkpointing: bool,
               seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    out = model(ids, labels=labels)
    loss = out.loss + out.aux_loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_checkpointed_blocks_give_the_stored_gradients(kind):
    vocab = 64
    model = tiny_model(vocab) if kind == "dense" else moe_model(vocab)
    inject_lora(model, LoraConfig(r=4, alpha=8, dropout=0.2, targets="all-linear"))
    mark_trainable(model)
    with torch.no_grad():  # B = 0 would leave A's gradient zero: give the update a value
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    loss_ref, grads_ref = lora_grads(model, ids, labels, checkpointing=False)
    loss_ckpt, grads_ckpt = lora_grads(model, ids, labels, checkpointing=True)
    assert torch.equal(loss_ckpt, loss_ref)
    if kind == "moe":
        assert model(ids, labels=labels).aux_loss > 0  # the aux loss is in the checked graph
    for ref, got in zip(grads_ref, grads_ckpt, strict=True):
        assert ref.abs().sum() > 0
        assert rel_err(got, ref) <= 1e-6
    # A different dropout seed gives different gradients: the masks matter, and were replayed.
    _, grads_other = lora_grads(model, ids, labels, checkpointing=True, seed=8)
    assert max(rel_err(g, r) for g, r in zip(grads_other, grads_ref, strict=True)) > 1e-3


def test_checkpointing_is_off_outside_training_and_with_a_cache():
    model = tiny_model(64)
    model.activation_checkpointing = True
    model.eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        plain = model(ids).logits
    model.train()
    out = model(ids, use_cache=True)  # a cache is written in place: blocks run plainly
    assert torch.allclose(out.logits, plain, atol=1e-6)
    assert out.past_key_values.length == 6


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_checkpointed_training_with_accumulation_and_resume_equals_plain(tok, tmp_path):
    from safetensors.torch import load_file

    data = str(write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4)))
    base = dict(data=data, lora_r=4, lora_alpha=8.0, lora_dropout=0.1, batch_size=2,
                accumulation_steps=2, lr=1e-2, max_seq_len=64, amp_dtype="float32", seed=0,
                max_steps=4, save_every=2)
    fit(tiny_model(tok.vocab_size), tok, TrainConfig(out_dir=str(tmp_path / "a"), **base))
    # checkpointed, stopped half-way, resumed without checkpointing (a resumable change)
    fit(tiny_model(tok.vocab_size), tok,
          TrainConfig(out_dir=str(tmp_path / "b"), activation_checkpointing=True, stop_after=2,
                      **base))
    fit(tiny_model(tok.vocab_size), tok,
          TrainConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert rel_err(b[key], a[key]) <= 1e-6, key


# ------------------------------------------------------------------ chunked head + loss


def reference_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy written out: logsumexp of the row minus the target's logit."""
    logits = logits.float()
    return (logits.logsumexp(-1) - logits.gather(1, targets[:, None])[:, 0]).sum()


@pytest.mark.parametrize("rows", [1, 4, 100])
def test_chunked_linear_cross_entropy_equals_the_whole_logits(rows):
    torch.manual_seed(0)
    h = torch.randn(11, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (11,))
    ref = reference_ce(h @ w.t() + b, t)
    ref_grads = torch.autograd.grad(ref * 0.37, (h, w, b))
    got = linear_cross_entropy(h, w, b, t, rows=rows)
    grads = torch.autograd.grad(got * 0.37, (h, w, b))
    assert rel_err(got, ref) <= 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 1e-6
    with torch.no_grad():  # eval: the loss alone, the same number
        assert rel_err(linear_cross_entropy(h, w, b, t, rows=rows), ref) <= 1e-6


def test_the_models_chunked_loss_and_lora_gradients_equal_the_whole_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * 5)  # 5 positions a chunk
    vocab = 64
    model = tiny_model(vocab)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    mark_trainable(model)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    ids = torch.randint(0, vocab, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    grads = torch.autograd.grad(out.loss, lora_parameters(model))
    # reference: every logit, then the masked mean written out
    logits = model(ids).logits[:, :-1].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    counted = targets != -100
    ref = reference_ce(logits[counted], targets[counted]) / counted.sum()
    ref_grads = torch.autograd.grad(ref, lora_parameters(model))
    assert rel_err(out.loss, ref) <= 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 1e-6


def test_lora_on_the_output_head_still_trains():
    vocab = 64
    model = tiny_model(vocab)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["lm_head", "q_proj"]))
    mark_trainable(model)
    with torch.no_grad():
        model.lm_head.lora_B["default"].weight.normal_(std=0.1)
    ids = torch.randint(0, vocab, (2, 10))
    out = model(ids, labels=ids)
    logits = model(ids).logits[:, :-1].reshape(-1, vocab)
    ref = reference_ce(logits, ids[:, 1:].reshape(-1)) / logits.shape[0]
    assert rel_err(out.loss, ref) <= 1e-6
    out.loss.backward()
    assert model.lm_head.lora_A["default"].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ will it fit


def test_the_estimate_counts_weights_adapters_and_checkpointed_activations():
    model = tiny_model(64, hidden=32, layers=2)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    mark_trainable(model)
    lora = sum(p.numel() for p in lora_parameters(model))
    unique = {id(p): p for p in model.parameters()}.values()
    cpu = torch.device("cpu")
    plain = estimate_memory(model, 8, 256, amp_dtype=None, device=cpu)
    assert plain.weights == sum(p.numel() * 4 for p in unique)
    assert plain.trainable == lora * 16  # weight, gradient and two AdamW moments, float32
    model.activation_checkpointing = True
    ckpt = estimate_memory(model, 8, 256, amp_dtype=None, device=cpu)
    assert 0 < ckpt.activations < plain.activations
    assert estimate_memory(model, 16, 256, amp_dtype=None, device=cpu).activations > \
        ckpt.activations


def test_train_prints_the_estimate_before_the_first_step_and_the_peak_after(tok, tmp_path,
                                                                              capsys):
    data = str(write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4)))
    fit(tiny_model(tok.vocab_size), tok,
          TrainConfig(data=data, out_dir=str(tmp_path / "run"), lora_r=4, batch_size=4,
                      max_seq_len=64, amp_dtype="float32", max_steps=2, log_every=1))
    err = capsys.readouterr().err
    estimate = err.index("memory: estimated peak")
    assert estimate < err.index("step 1/2") < err.index("memory: measured peak")


# ------------------------------------------------------------------ loading shard by shard

LOAD_WORKER = """
import json, sys
from pathlib import Path
import torch
from minilora.model.io import load_model

def vm(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

# A first load pays the process's one-time costs (lazy library init, about 80 MB here, kept
# after): they are not the loader's, so the measured load is the second.
load_model(sys.argv[1], dtype=torch.bfloat16)
Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from here
before = vm("VmRSS")
model = load_model(sys.argv[1], dtype=torch.float32)
peak = vm("VmHWM") - before
size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"peak": peak, "model": size}))
"""


def test_a_sharded_folder_loads_without_holding_the_model_twice(tmp_path):
    import json
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=16000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="3MB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 4
    largest = max(s.stat().st_size for s in shards)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WORKER, str(tmp_path / "sharded")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # float32 from bfloat16 files: a whole-file reader holds 1.5x the model at once
    assert got["peak"] <= 1.1 * (got["model"] + largest), (got, largest)
    # and the values are transformers' own
    model = load_model(tmp_path / "sharded")
    ids = torch.randint(0, 16000, (1, 8))
    with torch.no_grad():
        ref = hf.float()(ids).logits
        assert rel_err(model(ids).logits, ref) <= 1e-4  # float32 rounding over 6 layers


def test_the_estimate_counts_moe_activations_at_the_experts_width():
    # per token and layer the MLP saves gate, up, silu and their product for each of the k
    # routed experts, each moe_intermediate_size wide; intermediate_size is not theirs
    base = dict(model_type="minimind", minimind_generation="minimind3", vocab_size=64,
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, qk_norm=True, use_moe=True, num_experts=4,
                num_experts_per_tok=2)

    def activations(inter: int, moe: int) -> int:
        model = CausalLM(ModelConfig(**base, intermediate_size=inter, moe_intermediate_size=moe))
        return estimate_memory(model, 2, 16, amp_dtype=None,
                               device=torch.device("meta")).activations

    assert activations(4096, 64) == activations(64, 64)
    tokens, layers, k, float32 = 2 * 16, 2, 2, 4
    assert activations(64, 96) - activations(64, 64) == layers * tokens * 4 * k * 32 * float32
