"""Many adapters on one base (issue 8): named adapters, switching, combining, mixed batches,
hot swap, PEFT's multi-adapter folders, and the command line."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import run_cli
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.adapters.peft import find_adapters
from minilora.core.errors import AdapterError
from minilora.decoding.generation import generate, generate_batch
from minilora.lora.injection import (
    count_parameters,
    inject_lora,
    lora_parameters,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minilora.lora.layer import LoraConfig, LoRALinear, lora_modules
from minilora.lora.named import (
    active_adapters,
    combine_adapters,
    delete_adapter,
    list_adapters,
    mixed_adapters,
    set_active,
)
from minilora.model.decoder import CausalLM, ModelConfig

torch.set_num_threads(1)

VOCAB = 64


def tiny(seed: int = 0) -> CausalLM:
    """hidden 32, 2 layers, GQA, an untied head (so greedy output is not an echo of the input)."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return CausalLM(config).eval()


def ids(seed: int = 1, rows: int = 4, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw).logits


def perturb(model: nn.Module, name: str, seed: int, std: float = 0.3) -> None:
    """Gives adapter `name` a non-zero B (it starts at zero) so it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if name in m.lora_A:
                b = m.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen) * std)


def not_routed(model: nn.Module) -> bool:
    return all(m.routes is None for _, m in lora_modules(model))


def train_steps(model: nn.Module, task: torch.Tensor, steps: int = 4) -> None:
    """A few AdamW steps on the active adapters, as the trainer does them."""
    mark_trainable(model)
    opt = torch.optim.AdamW(lora_parameters(model), lr=3e-2)
    model.train()
    for _ in range(steps):
        model(task, labels=task).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


TASK_A = torch.arange(12).repeat(2, 1) % VOCAB  # counting up
TASK_B = torch.full((2, 12), 7)  # one token, repeated


def two_adapters() -> tuple[CausalLM, dict[str, torch.Tensor]]:
    """A base with adapter "a" (q, v; r 4) and "b" (all-linear; r 2, rsLoRA) trained on two
    tasks; returns the model and the logits of base / a / b recorded right after training."""
    model = tiny()
    x = ids()
    out = {"base": logits(model, x)}
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), name="a")
    train_steps(model, TASK_A)
    out["a"] = logits(model, x)
    inject_lora(model, LoraConfig(r=2, alpha=4, use_rslora=True), name="b")
    train_steps(model, TASK_B)
    out["b"] = logits(model, x)
    return model, out


# ---------------------------------------------------------------- named adapters


def test_two_trained_adapters_switch_none_is_base_and_delete_keeps_the_other():
    model, out = two_adapters()
    x = ids()
    assert list_adapters(model) == ["a", "b"] and active_adapters(model) == ["b"]
    assert (out["a"] - out["base"]).abs().max() > 1e-2
    assert (out["b"] - out["base"]).abs().max() > 1e-2
    a_before = {k: p.detach().clone() for k, p in enumerate(lora_parameters(model, "a"))}
    set_active(model, "a")
    assert torch.equal(logits(model, x), out["a"])
    # training "b" left "a" exactly as it was (only the active adapter is trainable)
    assert all(torch.equal(p, a_before[k]) for k, p in enumerate(lora_parameters(model, "a")))
    set_active(model, "b")
    assert torch.equal(logits(model, x), out["b"])
    set_active(model, None)
    assert torch.equal(logits(model, x), out["base"])
    set_active(model, [])
    assert active_adapters(model) == [] and torch.equal(logits(model, x), out["base"])
    # both: the updates add up, which is what merging both into W computes
    set_active(model, ["a", "b"])
    both = logits(model, x)
    copy = deepcopy(model)
    merge_lora(copy)
    torch.testing.assert_close(logits(copy, x), both, rtol=1e-5, atol=1e-5)
    set_active(model, "a")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"] and torch.equal(logits(model, x), out["a"])
    # layers that only "b" had are plain Linear again; "a"'s keys are untouched
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert [n for n, _ in lora_modules(model)] == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]
    delete_adapter(model, "a")
    assert not lora_modules(model) and torch.equal(logits(model, x), out["base"])


def test_state_dict_keys_default_unchanged_named_beside_it():
    model = tiny()
    base_keys = set(model.state_dict())
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    inject_lora(model, LoraConfig(r=3, targets=["q_proj", "o_proj"]), name="persona")
    keys = set(model.state_dict()) - base_keys
    q0, o0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    # one layout for every adapter (PEFT's): lora_A.<name>; files drop the name (test below)
    assert f"{q0}.lora_A.default.weight" in keys and f"{q0}.lora_B.default.weight" in keys
    assert f"{q0}.lora_A.persona.weight" in keys
    assert f"{o0}.lora_B.persona.weight" in keys
    assert f"{o0}.lora_A.default.weight" not in keys  # the default adapter is on q only
    assert len(keys) == 2 * 2 + 2 * 4  # 2 layers: default on q; persona on q and o
    q = model.get_submodule(q0)
    assert (q.r["default"], q.r["persona"]) == (2, 3)  # settings per adapter name
    # a base checkpoint still loads; only LoRA keys are missing
    result = model.load_state_dict({k: v for k, v in model.state_dict().items()
                                    if k in base_keys}, strict=False)
    assert set(result.missing_keys) == keys and not result.unexpected_keys


def test_names_and_states_are_checked():
    model = tiny()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match=r"already have LoRA adapter 'a'"):
        inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    for bad in ("base", "x.y", "", "-a"):
        with pytest.raises(ValueError, match="adapter name"):
            inject_lora(model, LoraConfig(r=2, targets=["k_proj"]), name=bad)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]; the model has \['a'\]"):
        set_active(model, ["a", "zz"])
    with pytest.raises(ValueError, match="unknown adapter"):
        delete_adapter(model, "zz")
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        inject_lora(model, LoraConfig(r=2, targets=["k_proj"]), name="b")
    with pytest.raises(ValueError, match="unmerge_lora"):
        set_active(model, None)
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
        delete_adapter(model, "a")
    set_active(model, "a")  # no change: allowed while merged
    unmerge_lora(model)
    delete_adapter(model, "a")
    assert not lora_modules(model)


def test_trainer_trains_only_the_active_adapter(tmp_path):
    from helpers import chat_rows, fit, tiny_model, tiny_tokenizer, write_jsonl
    from minilora.training.loop import TrainConfig

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="frozen")
    perturb(model, "frozen", seed=1)
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"]), name="learner")
    frozen = [p.detach().clone() for p in lora_parameters(model, "frozen")]
    learner = [p.detach().clone() for p in lora_parameters(model, "learner")]
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    result = fit(model, tok, TrainConfig(data=str(data), out_dir=str(tmp_path / "run"),
                                           max_steps=2, batch_size=2, lr=1e-2, seed=0))
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(model, "frozen"), frozen,
                                                  strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(lora_parameters(model, "learner"), learner,
                                                      strict=True))
    assert count_parameters(model).trainable == sum(p.numel() for p in learner)
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as f:
        assert all(".v_proj." in k for k in f.keys())  # the active adapter was saved


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_named_adapters_round_trip(tmp_path):
    model, out = two_adapters()
    x = ids()
    set_active(model, ["a", "b"])
    with pytest.raises(AdapterError, match=r"holds adapters \['a', 'b'\].*name="):
        save_adapter(model, tmp_path / "x")
    save_adapter(model, tmp_path / "a", name="a")
    save_adapter(model, tmp_path / "b", name="b")
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    # PEFT's layout: no adapter name in the key
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in keys
    assert not any(".a." in k or ".b." in k for k in keys)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 4, True)
    fresh = tiny()
    load_adapter(fresh, tmp_path / "b", name="b")
    load_adapter(fresh, tmp_path / "a", name="a")
    assert active_adapters(fresh) == ["a"]  # the one loaded last
    assert torch.equal(logits(fresh, x), out["a"])
    set_active(fresh, "b")
    assert torch.equal(logits(fresh, x), out["b"])
    # the fingerprint of an adapter covers its own layers only
    other = tiny(seed=5)
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(other, tmp_path / "a", name="a")
    assert not lora_modules(other)


def test_a_failed_load_leaves_the_active_adapters_as_they_were(tmp_path):
    other = tiny(seed=5)
    inject_lora(other, LoraConfig(r=2, targets=["q_proj"]), name="b")
    save_adapter(other, tmp_path / "b", name="b")  # recorded on another base
    model = tiny()
    x = ids()
    inject_lora(model, LoraConfig(r=2, targets=["v_proj"]), name="a")
    inject_lora(model, LoraConfig(r=2, targets=["o_proj"]), name="c")
    perturb(model, "a", seed=1)
    perturb(model, "c", seed=2)
    set_active(model, ["a", "c"])
    before = logits(model, x)
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(model, tmp_path / "b", name="b")
    assert list_adapters(model) == ["a", "c"]
    assert active_adapters(model) == ["a", "c"]
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "base", ""])
def test_a_bad_adapter_name_is_refused_before_any_file_is_read(tmp_path, name):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text("{not json")  # what ../x would read
    (tmp_path / "sub").mkdir()
    model = tiny()
    with pytest.raises(AdapterError, match=r"adapter name .*expected letters, digits"):
        load_adapter(model, tmp_path / "sub", name=name)
    assert not lora_modules(model)


def test_hot_swap_reuses_the_slot_and_a_compiled_model_does_not_recompile(tmp_path):
    model = tiny()
    x = ids()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="slot")
    perturb(model, "slot", seed=1)
    first = logits(model, x)
    save_adapter(model, tmp_path / "one", name="slot")
    perturb(model, "slot", seed=2)
    second = logits(model, x)
    save_adapter(model, tmp_path / "two", name="slot")
    params = [id(p) for p in model.parameters()]

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, second)
        n = len(graphs)
        load_adapter(model, tmp_path / "one", name="slot")  # hot swap: copied in place
        assert [id(p) for p in model.parameters()] == params
        torch.testing.assert_close(compiled(x).logits, first, rtol=1e-5, atol=1e-5)
        load_adapter(model, tmp_path / "two", name="slot")
        torch.testing.assert_close(compiled(x).logits, second, rtol=1e-5, atol=1e-5)
        assert len(graphs) == n  # no recompilation for a hot swap
        set_active(model, None)  # switching what is active is a new graph (Python state)
        torch.testing.assert_close(compiled(x).logits, logits(tiny(), x))
        assert len(graphs) > n
        # a mixed batch compiles too, in one graph (no break at the adapter_names hook)
        names = ["slot", None, "slot", None]
        torch.testing.assert_close(compiled(x, adapter_names=names).logits,
                                   logits(model, x, adapter_names=names))
        assert not_routed(model)  # cleared after the call
        torch.testing.assert_close(compiled(x).logits, logits(tiny(), x))
    # another rank does not fit the slot
    other = tiny()
    inject_lora(other, LoraConfig(r=4, targets=["q_proj", "v_proj"]), name="slot")
    save_adapter(other, tmp_path / "r4", name="slot")
    with pytest.raises(AdapterError, match="mis-shaped"):
        load_adapter(model, tmp_path / "r4", name="slot")


# ---------------------------------------------------------------- combining


def test_linear_combination_is_the_weighted_sum_of_updates(tmp_path):
    model, _ = two_adapters()
    weights = {"a": 0.7, "b": -0.3}
    report = combine_adapters(model, weights, name="mix")
    assert (report.method, report.r, report.max_error) == ("linear", 4 + 2, 0.0)
    assert active_adapters(model) == ["mix"]
    for path, m in lora_modules(model):
        expected = sum(w * m.delta_weight(n) for n, w in weights.items() if n in m.lora_A)
        torch.testing.assert_close(m.delta_weight("mix"), expected, rtol=0, atol=1e-6,
                                   msg=path)
    x = ids()
    mixed = logits(model, x)
    save_adapter(model, tmp_path / "mix", name="mix")
    fresh = tiny()
    load_adapter(fresh, tmp_path / "mix")
    torch.testing.assert_close(logits(fresh, x), mixed, rtol=1e-5, atol=1e-5)


def test_svd_combination_full_rank_is_exact_lower_rank_reports_its_error():
    model, _ = two_adapters()
    weights = {"a": 0.5, "b": 0.5}
    full = combine_adapters(model, weights, name="full", method="svd")
    assert full.r == 6 and full.max_error < 1e-5
    low = combine_adapters(model, weights, name="low", method="svd", r=1)
    assert low.r == 1 and 0.01 < low.max_error < 1
    for path, m in lora_modules(model):
        expected = sum(w * m.delta_weight(n) for n, w in weights.items() if n in m.lora_A)
        torch.testing.assert_close(m.delta_weight("full"), expected, rtol=0, atol=1e-5)
        # the reported error is that of the best rank-1 approximation (Eckart-Young)
        s = torch.linalg.svdvals(expected)
        best = (s[1:].square().sum().sqrt() / s.square().sum().sqrt()).item()
        assert abs(low.errors[path] - best) < 1e-4, path
    with pytest.raises(ValueError, match="larger than min"):
        combine_adapters(model, weights, name="big", method="svd", r=64)
    with pytest.raises(ValueError, match="exists already"):
        combine_adapters(model, weights, name="low")
    with pytest.raises(ValueError, match=r"rank 3 \(r\): method='linear' has the sum of the ranks"):
        combine_adapters(model, weights, name="lin", r=3)
    with pytest.raises(ValueError, match="method must be one of"):
        combine_adapters(model, weights, name="ties", method="ties")


# ---------------------------------------------------------------- mixed batches


def test_mixed_batch_equals_rows_run_separately():
    model, _ = two_adapters()
    x = ids(rows=5)
    names = ["a", None, "b", "base", "a"]
    mixed = logits(model, x, adapter_names=names)
    with mixed_adapters(model, names):
        assert torch.equal(logits(model, x), mixed)
    for i, name in enumerate(names):
        set_active(model, name)
        alone = logits(model, x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # the routing ends with the call: a plain call uses the active adapter again
    set_active(model, "b")
    torch.testing.assert_close(logits(model, x[:1]), logits(model, x[:1]))
    assert not_routed(model)


def test_mixed_batch_trains_each_row_into_its_own_adapter():
    model = tiny()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="b")
    perturb(model, "a", 1)
    perturb(model, "b", 2)
    for p in model.parameters():
        p.requires_grad_(False)
    a, b = lora_parameters(model, "a"), lora_parameters(model, "b")
    for p in a + b:
        p.requires_grad_(True)
    x = ids(rows=2)
    model(x[:1], labels=x[:1], adapter_names=["a"]).loss.backward()
    grads_a = [p.grad.clone() for p in a]
    assert all(p.grad is None for p in b)
    for p in a:
        p.grad = None
    model(x, labels=x, adapter_names=["a", None]).loss.backward()
    # the same row; the mean over twice the tokens halves it
    for g, p in zip(grads_a, a, strict=True):
        torch.testing.assert_close(p.grad * 2, g, rtol=1e-4, atol=1e-6)


def test_mixed_batch_refusals():
    model, _ = two_adapters()
    x = ids(rows=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        model(x, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="mixed batch of 3 rows"):
        model(x, adapter_names=["a", "b", None])
    assert not_routed(model)  # cleared after the error
    merge_lora(model)
    with pytest.raises(ValueError, match="mixed batch.*merged.*unmerge_lora"):
        model(x, adapter_names=["a", "b"])
    unmerge_lora(model)
    assert logits(model, x, adapter_names=["a", "b"]).shape == (2, 9, VOCAB)
    with pytest.raises(ValueError, match="not nested"), mixed_adapters(model, ["a", "b"]):
        model(x, adapter_names=["b", "a"])


def test_mixed_batch_on_moe_experts_is_refused_attention_is_fine():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="minimind", vocab_size=VOCAB, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 use_moe=True, num_experts=2, num_experts_per_tok=1)).eval()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="att")
    perturb(model, "att", 1)
    x = ids(rows=2)
    mixed = logits(model, x, adapter_names=["att", None])
    torch.testing.assert_close(mixed[:1], logits(model, x[:1]), rtol=1e-5, atol=1e-5)
    set_active(model, None)
    torch.testing.assert_close(mixed[1:], logits(model, x[1:]), rtol=1e-5, atol=1e-5)
    inject_lora(model, LoraConfig(r=2, targets="all-linear"), name="all")
    with pytest.raises(ValueError, match="MoE experts"):
        model(x, adapter_names=["all", None])


def test_generate_with_mixed_adapters_equals_each_row_alone():
    model, _ = two_adapters()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12], [1, 2, 3]]
    names = ["a", "b", None, "b"]
    outputs = generate_batch(model, prompts, max_new_tokens=8, adapter_names=names)
    for prompt, name, got in zip(prompts, names, outputs, strict=True):
        set_active(model, name)
        assert got == generate(model, prompt, max_new_tokens=8), name
    assert len({tuple(o) for o in outputs[:3]}) == 3  # the adapters do change the text


def test_one_adapter_forward_is_the_single_adapter_code_path():
    """With one active adapter (others present), the layer computes exactly what a layer with
    that adapter alone computes: W x + b + s B A x via one addmm into the output."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lin = LoRALinear(base, r=3, alpha=6.0)
    lin.add_adapter("other", r=2, alpha=2.0)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        lin.lora_B["other"].weight.normal_()
    x = torch.randn(4, 5, 12)
    a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    ref = x @ base.weight.T + base.bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(lin(x), ref)
    lin.set_active(["default", "other"])
    ref2 = ref + 1.0 * (x @ lin.lora_A["other"].weight.T) @ lin.lora_B["other"].weight.T
    torch.testing.assert_close(lin(x), ref2)
    lin.merge()
    torch.testing.assert_close(lin(x), ref2, rtol=1e-5, atol=1e-5)
    lin.unmerge()
    lin.set_active([])
    torch.testing.assert_close(lin(x), x @ base.weight.T + base.bias)


def test_merge_and_unload_folds_the_active_adapter_only():
    model, out = two_adapters()
    set_active(model, "a")
    x = ids()
    unloaded = merge_and_unload(model)
    assert not lora_modules(unloaded)
    torch.testing.assert_close(logits(unloaded, x), out["a"], rtol=1e-5, atol=1e-5)
    assert not unloaded._forward_pre_hooks  # the adapter_names hook goes with the LoRA


# ---------------------------------------------------------------- PEFT interop


def test_peft_two_named_adapters_load_and_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()

    cfg_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg_b = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                            use_rslora=True)
    theirs = peft.get_peft_model(llama(), cfg_a, adapter_name="a")
    theirs.add_adapter("b", cfg_b)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    theirs.eval()
    x = ids()
    want = {}
    for name in ("a", "b"):
        theirs.set_adapter(name)
        want[name] = logits(theirs, x)
    want_mixed = logits(theirs, x, adapter_names=["a", "b", "__base__", "a"])
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert sorted(find_adapters(tmp_path / "peft")) == ["a", "b"]  # subfolder per adapter

    ours = llama()
    load_adapter(ours, tmp_path / "peft", name="a")
    load_adapter(ours, tmp_path / "peft", name="b")
    for name in ("a", "b"):
        set_active(ours, name)
        torch.testing.assert_close(logits(ours, x), want[name], rtol=1e-5, atol=1e-5)
    mixed = logits(ours, x, adapter_names=["a", "b", None, "a"])
    torch.testing.assert_close(mixed, want_mixed, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match=r"subfolders \['a', 'b'\].*name="):
        load_adapter(llama(), tmp_path / "peft")

    # and back: our two adapters, saved one folder each, load into PEFT under their names
    save_adapter(ours, tmp_path / "ours" / "a", name="a")
    save_adapter(ours, tmp_path / "ours" / "b", name="b")
    again = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours" / "a"),
                                           adapter_name="a")
    again.load_adapter(str(tmp_path / "ours" / "b"), adapter_name="b")
    again.eval()
    for name in ("a", "b"):
        again.set_adapter(name)
        torch.testing.assert_close(logits(again, x), want[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import tiny_tokenizer
    from minilora.model.io import save_model

    root = tmp_path_factory.mktemp("multi_cli")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False))
    save_model(model, root / "base")
    tok.save(root / "base")
    for seed, name in ((1, "alpha"), (2, "beta")):
        inject_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name=name)
        perturb(model, name, seed, std=1.0)
        save_adapter(model, root / name, name=name)
    return root


def expected_text(root: Path, adapter: str | None, prompt: str) -> str:
    from minilora.data.tokenizer import Tokenizer
    from minilora.model.io import load_model

    model = load_model(root / "base").eval()
    if adapter is not None:
        load_adapter(model, root / adapter, name=adapter)
    tok = Tokenizer.from_file(root / "base")
    ids_, _ = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.decode(generate(model, ids_, max_new_tokens=6,
                               eos_token_id=[tok.im_end_id, tok.eos_token_id]))


def test_cli_chat_switches_adapters(cli_dir, capsys, monkeypatch):
    base = str(cli_dir / "base")
    code, out, err = run_cli(
        ["chat", "--model", base, "--adapter", str(cli_dir / "alpha"), "--adapter",
         f"b={cli_dir / 'beta'}", "--max-new-tokens", "6"],
        capsys, "Hi\n/reset\n/adapter b\nHi\n/reset\n/adapter base\nHi\n/adapter zz\n/quit\n",
        monkeypatch)
    assert code == 0, err
    replies = out.splitlines()
    assert len(replies) == 3
    assert replies[0].strip() == expected_text(cli_dir, "alpha", "Hi").strip()
    assert replies[1].strip() == expected_text(cli_dir, "beta", "Hi").strip()
    assert replies[2].strip() == expected_text(cli_dir, None, "Hi").strip()
    assert len(set(replies)) == 3
    assert "active: ['b']" in err and "no adapter 'zz'" in err


def test_cli_generate_adapter_per_prompt(cli_dir, capsys, monkeypatch):
    lines = [{"prompt": "Hi", "adapter": "alpha"}, {"prompt": "Say hello.", "adapter": None},
             {"prompt": "Hi there", "adapter": "beta"}]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\n"
    code, out, err = run_cli(
        ["generate", "--model", str(cli_dir / "base"), "--adapter", str(cli_dir / "alpha"),
         "--adapter", str(cli_dir / "beta"), "--adapter-per-prompt", "--max-new-tokens", "6"],
        capsys, stdin, monkeypatch)
    assert code == 0, err
    got = [json.loads(x) for x in out.splitlines()]
    assert [g["adapter"] for g in got] == ["alpha", None, "beta"]
    for g in got:
        assert g["text"] == expected_text(cli_dir, g["adapter"], g["prompt"])
    code, _, err = run_cli(
        ["generate", "--model", str(cli_dir / "base"), "--adapter", str(cli_dir / "alpha"),
         "--adapter-per-prompt"], capsys, '{"prompt": "Hi", "adapter": "nope"}\n', monkeypatch)
    assert code == 2 and "line 1: no adapter 'nope'" in err
    # a hostile stdin line (too deep for json, an integer too long): one line, exit 2
    for bad in ("[" * 100_000 + "]" * 100_000, '{"prompt": ' + "9" * 5000 + "}"):
        code, _, err = run_cli(
            ["generate", "--model", str(cli_dir / "base"), "--adapter", str(cli_dir / "alpha"),
             "--adapter-per-prompt"], capsys, f'{{"prompt": "Hi"}}\n{bad}\n', monkeypatch)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "stdin line 2: not valid JSON" in err


def test_cli_combine(cli_dir, capsys, tmp_path):
    code, out, err = run_cli(
        ["combine", "--model", str(cli_dir / "base"), str(cli_dir / "alpha"),
         str(cli_dir / "beta"), "--weights", "0.7", "0.3", "--out", str(tmp_path / "mix")],
        capsys)
    assert code == 0, err
    assert "linear, r=4" in out
    from minilora.model.io import load_model

    model = load_model(cli_dir / "base")
    load_adapter(model, cli_dir / "alpha", name="alpha")
    load_adapter(model, cli_dir / "beta", name="beta")
    load_adapter(model, tmp_path / "mix", name="mix")
    for _, m in lora_modules(model):
        want = 0.7 * m.delta_weight("alpha") + 0.3 * m.delta_weight("beta")
        torch.testing.assert_close(m.delta_weight("mix"), want, rtol=0, atol=1e-5)
    code, out, err = run_cli(
        ["combine", "--model", str(cli_dir / "base"), str(cli_dir / "alpha"),
         str(cli_dir / "beta"), "--weights", "0.5", "0.5", "--method", "svd", "--r", "1",
         "--out", str(tmp_path / "svd")], capsys)
    assert code == 0 and "svd, r=1" in out and "max relative error" in out
    code, _, err = run_cli(
        ["combine", "--model", str(cli_dir / "base"), str(cli_dir / "alpha"), "--weights", "1",
         "2", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "1 adapters but 2 --weights" in err


def test_cli_eval_still_takes_one_adapter(cli_dir, capsys):
    code, _, err = run_cli(
        ["merge", "--model", str(cli_dir / "base"), "--adapter", str(cli_dir / "alpha"),
         "--adapter", str(cli_dir / "beta"), "--out", "unused"], capsys)
    assert code == 2 and "one --adapter at a time for `merge`" in err


def test_row_hook_is_removed_with_the_last_adapter():
    model = tiny()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]), name="a")
    assert model._forward_pre_hooks
    delete_adapter(model, "a")
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(TypeError):
        model(ids(), adapter_names=["a"] * 4)  # no LoRA: the keyword means nothing


# Library errors name keywords as data (err.fields); the command line gives its own words.
_JARGON = ("name=", "format=", "method=", "check_fingerprint", "=True", "=False", "config=")


def test_cli_errors_say_flags_not_library_keywords(cli_dir, capsys, tmp_path):
    import shutil

    base = str(cli_dir / "base")
    both = tmp_path / "both"  # PEFT's layout of named adapters, with no default adapter
    both.mkdir()
    shutil.copytree(cli_dir / "alpha", both / "a")
    shutil.copytree(cli_dir / "beta", both / "b")
    bare = tmp_path / "bare"  # a model folder that lost its config.json
    bare.mkdir()
    shutil.copy(cli_dir / "base" / "model.safetensors", bare)
    from minilora.model.io import load_model

    model = load_model(cli_dir / "base")
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"], use_dora=True))
    save_adapter(model, tmp_path / "dora", base_model_name_or_path=base)
    folder_words = "an adapter folder: an output path not ending in .pth"
    cases = [
        (["generate", "--model", base, "--adapter", str(both), "Hi"],
         f"{both} holds adapters in subfolders ['a', 'b']: pass --adapter NAME=PATH (or the "
         "subfolder)"),
        (["convert", "--model", base, str(cli_dir / "alpha"), str(tmp_path / "alpha.pth")],
         f"save them in PEFT's format ({folder_words})"),
        (["convert", "--model", base, str(tmp_path / "dora"), str(tmp_path / "dora.pth")],
         f"MiniMind's format has no place for DoRA's magnitude vectors; save a DoRA adapter in "
         f"PEFT's format ({folder_words})"),
        (["combine", "--model", base, str(cli_dir / "alpha"), str(cli_dir / "beta"),
          "--weights", "1", "1", "--r", "3", "--out", str(tmp_path / "mix")],
         "rank 3 (--r): --method linear has the sum of the ranks (4); use --method svd for "
         "another rank"),
        (["info", str(bare)],
         f"{bare}/config.json: no config.json; pass the model's config (--model-config FILE)"),
        (["train", "--model", str(bare), "--data", str(tmp_path / "none.jsonl"), "--out",
          str(tmp_path / "run")],
         f"{bare}/config.json: no config.json; pass the model's config (--model-config FILE)"),
    ]
    for argv, ending in cases:
        code, _, err = run_cli(argv, capsys)
        line = err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"minilora {argv[0]}: error: "), err
        assert line.endswith(ending), line
        assert not [word for word in _JARGON if word in line], line
    assert not (tmp_path / "alpha.pth").exists() and not (tmp_path / "mix").exists()


def test_a_batch_whose_every_row_names_one_adapter_runs_it_as_the_active_adapter():
    """Every row of one adapter: each layer runs that adapter as its one active adapter (the
    single adapter's kernel, fused with its siblings), so the batch equals the adapter set
    active exactly; a layer without it gives the base; a list of the wrong length is still
    refused."""
    model, _ = two_adapters()
    inject_lora(model, LoraConfig(r=2, targets=["o_proj"]), name="o_only")
    perturb(model, "o_only", 5)
    x = ids(rows=3)
    for name in ("a", "o_only"):
        mixed = logits(model, x, adapter_names=[name] * 3)
        set_active(model, name)
        assert torch.equal(mixed, logits(model, x))
    set_active(model, None)
    with pytest.raises(ValueError, match="mixed batch of 4 rows"):
        model(x, adapter_names=["a"] * 4)
    assert not_routed(model)
