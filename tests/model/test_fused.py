"""Fused projections (minilora.model.fused): q/k/v and gate/up as one product, LoRA's A's stacked.

The fused group is checked against the formula written out here (x W^T + b + s (x A^T) B^T per
module) and against the same model with fusion off (`fused_projections(model, False)`), in
float32 (<= 1e-6 relative) and under bf16 autocast (2e-2 of the largest value; 5e-2 for
gradients through a whole model, whose bf16 roundings compound); every case the group cannot
take must run module by module, bit for bit as unfused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig, LoRALinear
from minilora.lora.named import mixed_adapters, set_active
from minilora.model.decoder import CausalLM, ModelConfig
from minilora.model.fused import fused_projections, project, set_fused_projections

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
BF16_REL = 2e-2  # of the largest value: bf16 keeps 8 significant bits


def _fused(ys: list[torch.Tensor]) -> bool:
    """Whether ys came out of one low-rank kernel node together (slices of its output)."""
    return (len({id(y.grad_fn) for y in ys}) == 1
            and "_LowRankLinear" in type(ys[0].grad_fn).__name__)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _group(bias: bool, lora: tuple[bool, ...], outs=(16, 8, 8), seed: int = 0):
    """Sibling projections reading a 12-wide input (q/k/v-like widths: GQA), LoRA where asked,
    with B != 0."""
    torch.manual_seed(seed)
    mods = []
    for out, on in zip(outs, lora, strict=True):
        lin = nn.Linear(12, out, bias=bias).requires_grad_(False)
        if on:
            lin = LoRALinear(lin, r=out // 4, alpha=float(out // 2))
            lin.lora_B["default"].weight.data.normal_(std=0.3)
        mods.append(lin)
    return mods


def _formula(mods, x):
    """Each module's output written out from its weights: x W^T + b + scaling x A^T B^T."""
    out = []
    for m in mods:
        y = x @ m.weight.detach().T + (0 if m.bias is None else m.bias.detach())
        if isinstance(m, LoRALinear) and m.active_adapters and m.enabled and not m.merged:
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            y = y + m.scaling["default"] * (x @ a.T) @ b.T
        out.append(y)
    return out


GROUP_CASES = [  # (bias, which modules carry LoRA)
    (False, (True, False, True)), (True, (True, True, True)), (True, (False, False, False)),
    (False, (False, True)),
]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias, lora", GROUP_CASES)
def test_project_equals_the_formula_and_its_gradients(bias, lora, autocast):
    outs = (16, 8, 8)[:len(lora)]
    mods = _group(bias, lora, outs)
    x = torch.randn(3, 5, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ys = project(mods, x)
    assert _fused(ys)
    assert [y.shape[-1] for y in ys] == list(outs)
    assert {y.dtype for y in ys} == {torch.bfloat16 if autocast else torch.float32}
    g = [torch.randn_like(y, dtype=torch.float32) for y in ys]
    fast_grads = torch.autograd.grad(ys, [x, *lora_parameters(nn.ModuleList(mods))],
                                     [gi.to(y.dtype) for gi, y in zip(g, ys, strict=True)])
    ref = _formula(mods, x)
    ref_grads = torch.autograd.grad(ref, [x, *lora_parameters(nn.ModuleList(mods))], g)
    limit = BF16_REL if autocast else 1e-6
    for y, r in zip(ys, ref, strict=True):
        assert _rel(y, r) <= limit
    for fg, rg in zip(fast_grads, ref_grads, strict=True):
        assert fg.dtype == rg.dtype and _rel(fg, rg) <= limit


def _lora_model(seed: int = 0, **extra) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(**SMALL, **extra))
    model.requires_grad_(False)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    mark_trainable(model)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] == 4:  # B: (out, r)
                p.normal_(std=0.2)
    return model


def _step(model, ids, autocast: bool, fused: bool):
    for p in model.parameters():
        p.grad = None
    with fused_projections(model, fused), torch.autocast("cpu", dtype=torch.bfloat16,
                                                          enabled=autocast):
        out = model(ids, labels=ids)
        logits = out.logits.float()
    out.loss.backward()
    return logits.detach(), out.loss.detach(), [p.grad for p in lora_parameters(model)]


MODEL_CASES = [("llama-gqa", {}), ("qwen2-bias", {"model_type": "qwen2", "attention_bias": True}),
               ("moe", {"use_moe": True, "num_experts": 3, "n_shared_experts": 1}),
               ("qk-norm", {"model_type": "qwen3", "qk_norm": True, "head_dim": 12})]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name, extra", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_fused_model_equals_unfused_logits_loss_and_lora_grads(name, extra, autocast):
    model = _lora_model(**extra)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = _step(model, ids, autocast, fused=True)
    logits0, loss0, grads0 = _step(model, ids, autocast, fused=False)
    limit = 2e-2 if autocast else 1e-6
    assert _rel(logits, logits0) <= limit and _rel(loss, loss0) <= limit
    assert len(grads) == len(grads0) > 0
    for g, g0 in zip(grads, grads0, strict=True):
        assert g.dtype == g0.dtype == torch.float32
        assert _rel(g, g0) <= (5e-2 if autocast else 1e-6)


def _group_runs(model, ids, **kw) -> int:
    """How many fused group products one forward of model runs."""
    import minilora.model.fused as fused_module

    calls = []
    original = fused_module.lowrank_linear
    fused_module.lowrank_linear = lambda *a: calls.append(1) or original(*a)
    try:
        model(ids, **kw)
    finally:
        fused_module.lowrank_linear = original
    return len(calls)


def _fuses(model) -> list[bool]:
    return [m.fuse_projections for m in model.modules() if hasattr(m, "fuse_projections")]


def test_a_plain_frozen_model_fuses_and_the_switch_turns_it_off():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL)).requires_grad_(False)
    other = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 7))
    assert all(_fuses(model)) and _group_runs(model, ids) == 4  # 2 layers x (qkv, gate/up)
    with fused_projections(model, False):
        assert not any(_fuses(model)) and _group_runs(model, ids) == 0
        # the model's own setting, not the process's: another model still fuses
        assert all(_fuses(other)) and _group_runs(other, ids) == 4
    assert all(_fuses(model))
    set_fused_projections(model, False)
    assert _group_runs(model, ids) == 0 and _group_runs(other, ids) == 4
    set_fused_projections(model, True)
    # full fine-tuning: every weight trains, so each module keeps its own autograd
    model.requires_grad_(True)
    assert _group_runs(model, ids) == 0
    with torch.no_grad():
        assert _group_runs(model, ids) == 4


def _fallback_cases():
    """(name, how to set the model up, forward kwargs): each must run unfused."""
    def dropout(m):
        inject_lora(m, LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.2), name="d")
        set_active(m, "d")
        m.train()

    def dora(m):
        inject_lora(m, LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=True), name="d")
        set_active(m, "d")

    def two_active(m):
        inject_lora(m, LoraConfig(r=2, alpha=8, targets="all-linear"), name="b")
        set_active(m, ["default", "b"])

    def hooked(m):
        for layer in m.model.layers:
            layer.self_attn.k_proj.register_forward_pre_hook(lambda mod, a: None)
            layer.mlp.up_proj.register_forward_pre_hook(lambda mod, a: None)

    def float64(m):
        m.double()

    def nf4(m):
        pytest.importorskip("bitsandbytes")
        from minilora.lora.qlora import quantize_model

        quantize_model(m, "nf4")

    return [("dropout", dropout, {}), ("dora", dora, {}), ("two-active", two_active, {}),
            ("hooks", hooked, {}), ("float64", float64, {}), ("nf4", nf4, {}),
            ("mixed-batch", lambda m: None, {"adapter_names": ["default", None]})]


@pytest.mark.parametrize("name, setup, kw", _fallback_cases(),
                         ids=[c[0] for c in _fallback_cases()])
def test_what_cannot_fuse_runs_module_by_module_exactly_as_unfused(name, setup, kw):
    model = _lora_model()
    setup(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    assert _group_runs(model, ids, **kw) == 0
    torch.manual_seed(3)
    fused = model(ids, **kw).logits
    torch.manual_seed(3)
    with fused_projections(model, False):
        unfused = model(ids, **kw).logits
    assert torch.equal(fused, unfused)


def test_merged_and_disabled_layers_fuse_their_base():
    """Merged (the merged weight) and disabled (the base alone) fuse; the output is the one of
    the unfused model to 1e-6."""
    from minilora.lora.injection import merge_lora

    model = _lora_model()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad(), fused_projections(model, False):
        want = model(ids).logits
    merge_lora(model)
    with torch.no_grad():
        assert _group_runs(model, ids) == 4
        assert _rel(model(ids).logits, want) <= 1e-5  # merged weights round differently
    model2 = _lora_model()
    for m in model2.modules():
        if isinstance(m, LoRALinear):
            m.enabled = False
    with torch.no_grad():
        assert _group_runs(model2, ids) == 4
        fused = model2(ids).logits
        with fused_projections(model2, False):
            assert _rel(fused, model2(ids).logits) <= 1e-6


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = _lora_model()
    inject_lora(model, LoraConfig(r=2, alpha=4, targets="all-linear"), name="b")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B["b"].weight.normal_(std=0.2)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        with mixed_adapters(model, ["default", "b"]):
            mixed = model(ids).logits
        for row, name in enumerate(["default", "b"]):
            set_active(model, name)
            alone = model(ids[row:row + 1]).logits  # fused: one active adapter
            assert _rel(mixed[row:row + 1], alone) <= 1e-5


def test_backward_keeps_no_concatenated_weight_in_float32():
    """The fp32 group node saves the module weights themselves, not a (sum out, in) copy."""
    mods = _group(False, (True, False, True))
    x = torch.randn(4, 12, requires_grad=True)
    q, k, v = project(mods, x)
    assert _fused([q, k, v])
    node = q.grad_fn
    saved = [t for t in node.saved_tensors if t is not None]
    assert not any(t.shape == (32, 12) for t in saved)
    ptrs = {t.data_ptr() for t in saved}
    assert all(m.weight.data_ptr() in ptrs for m in mods)


def test_state_dict_and_module_names_do_not_change():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 5)))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= names
    copy.deepcopy(model)  # no process-wide state on the model
