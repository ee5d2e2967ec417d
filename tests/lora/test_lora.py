"""Tests for minilora.lora.layer: LoraConfig, LoRALinear, injection, merging, counting."""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilora.core.errors import ConfigError
from minilora.lora.injection import (
    count_parameters,
    disabled,
    inject_lora,
    lora_parameters,
    mark_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minilora.lora.layer import LoraConfig, LoRALinear, MergeError, lora_modules

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 8, 2, 176, 97, 2
HEAD_DIM = HIDDEN // HEADS


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HIDDEN))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.post_attention_layernorm = nn.RMSNorm(HIDDEN)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(HIDDEN)


class MiniMindLike(nn.Module):
    """A stand-in with MiniMind's module names and shapes (GQA, SwiGLU, tied head)."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        x = self.model.embed_tokens(ids)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))  # (B, T, V)


def make_model(tie: bool = True, seed: int = 0) -> MiniMindLike:
    torch.manual_seed(seed)
    return MiniMindLike(tie=tie)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def perturb_b(model: nn.Module, seed: int = 3) -> None:
    """Makes every B non-zero so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- LoraConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"targets": []}, "targets"),
        ({"targets": "q_proj("}, "targets"),
        ({"targets": [3]}, "targets"),
        ({"exclude": "square"}, "exclude"),
        ({"init": "xavier"}, "init"),
        ({"use_rslora": 1}, "use_rslora"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)


def test_config_json_round_trip_and_unknown_key():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj"], exclude=["layers.0.q_proj"],
                     init="kaiming", use_rslora=True)
    back = LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match=r"unknown LoraConfig key\(s\) \['rank'\].*valid keys"):
        LoraConfig.from_dict({"rank": 8})


@pytest.mark.parametrize("r, alpha, rs, expected", [(8, 16, False, 2.0), (16, 16, True, 4.0)])
def test_scaling(r, alpha, rs, expected):
    assert LoraConfig(r=r, alpha=alpha, use_rslora=rs).scaling == expected
    lin = LoRALinear(nn.Linear(32, 32), r=r, alpha=alpha, use_rslora=rs)
    assert lin.scaling == {"default": expected}


# ---------------------------------------------------------------- LoRALinear


def test_lora_linear_matches_formula_and_gradients():
    """Forward and gradients equal W x + b + s * B A x written out by hand."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lin = LoRALinear(base, r=3, alpha=6.0)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    x = torch.randn(4, 5, 12, requires_grad=True)
    y = lin(x)
    a = lin.lora_A["default"].weight.detach().clone().requires_grad_()
    b = lin.lora_B["default"].weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = x2 @ base.weight.T + base.bias + 2.0 * (x2 @ a.T) @ b.T
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(lin.lora_A["default"].weight.grad, a.grad)
    torch.testing.assert_close(lin.lora_B["default"].weight.grad, b.grad)
    torch.testing.assert_close(x.grad, x2.grad)



def _fused_layer(dropout=0.0, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias).requires_grad_(False)
    lin = LoRALinear(base, r=3, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    return base, lin


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_training_forward_is_one_node_with_the_formulas_gradients(dropout):
    """With a frozen base the layer runs as one autograd node (minilora.core.lowrank's
    _LowRankLinear, hand-written backward); its forward and gradients equal the formula,
    dropout mask included."""
    base, lin = _fused_layer(dropout)
    x = torch.randn(4, 5, 12, requires_grad=True)
    torch.manual_seed(1)
    y = lin(x)
    assert "_LowRankLinear" in type(y.grad_fn).__name__
    a = lin.lora_A["default"].weight.detach().clone().requires_grad_()
    b = lin.lora_B["default"].weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    xd = F.dropout(x2, dropout, training=True) if dropout else x2  # the same mask
    ref = x2 @ base.weight.T + base.bias + 2.0 * (xd @ a.T) @ b.T
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(lin.lora_A["default"].weight.grad, a.grad)
    torch.testing.assert_close(lin.lora_B["default"].weight.grad, b.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_fused_node_passes_gradcheck_in_float64():
    base, lin = _fused_layer(bias=False)
    lin.double()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lin, (x,))


def test_trainable_base_weight_and_bias_get_their_gradients():
    base, lin = _fused_layer()
    lin.requires_grad_(True)
    x = torch.randn(4, 12)
    y = lin(x)
    g = torch.randn(4, 10)
    y.backward(g)
    torch.testing.assert_close(lin.weight.grad, g.T @ x)
    torch.testing.assert_close(lin.bias.grad, g.sum(0))


def test_bf16_autocast_gradients_match_float32():
    """Under bf16 autocast the one-node path's gradients stay close to the fp32 ones and arrive
    in the Parameters' own dtype (float32)."""
    _, lin = _fused_layer()
    x = torch.randn(64, 12)
    lin(x).square().sum().backward()
    ref = [p.grad.clone() for p in (lin.lora_A["default"].weight, lin.lora_B["default"].weight)]
    lin.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for p, r in zip((lin.lora_A["default"].weight, lin.lora_B["default"].weight), ref, strict=True):
        assert p.grad.dtype == torch.float32
        assert (p.grad - r).norm() / r.norm() < 3e-2

def test_lora_linear_owns_base_parameters_and_shapes():
    base = nn.Linear(16, 24)
    lin = LoRALinear(base, r=4, alpha=8)
    assert lin.weight is base.weight and lin.bias is base.bias
    assert lin.lora_A["default"].weight.shape == (4, 16)
    assert lin.lora_B["default"].weight.shape == (24, 4)
    assert set(lin.state_dict()) == {"weight", "bias", "lora_A.default.weight",
                                     "lora_B.default.weight"}
    # The adapter's own p (forward calls F.dropout with it, no op at all at p = 0); no module.
    with_dropout = LoRALinear(base, r=4, alpha=8, dropout=0.1)
    assert lin.lora_dropout["default"] == 0.0
    assert with_dropout.lora_dropout["default"] == 0.1
    assert not any(isinstance(m, nn.Dropout) for m in with_dropout.modules())


def test_r_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match=r"r=9 .*min\(16, 8\)"):
        LoRALinear(nn.Linear(16, 8), r=9, alpha=9)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(32, 32), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    x = torch.randn(8, 32)
    lin.eval()
    assert torch.equal(lin(x), lin(x))
    lin.train()
    assert not torch.equal(lin(x), lin(x))


# ---------------------------------------------------------------- injection


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_output_equals_base_right_after_injection(init):
    model = make_model()
    x = ids()
    with torch.no_grad():
        before = model(x)
        inject_lora(model, LoraConfig(r=4, targets="all-linear", init=init))
        after = model(x)
    assert torch.equal(before, after)
    a = lora_modules(model)[0][1].lora_A["default"].weight
    assert a.abs().sum() > 0  # A is initialised, only B is zero


def test_base_state_dict_keys_unchanged():
    model = make_model()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoraConfig(r=4))
    keys = set(model.state_dict())
    lora_keys = {k for k in keys if ".lora_A." in k or ".lora_B." in k}
    assert keys - lora_keys == set(base_sd)
    # a base checkpoint loads into the injected model; only LoRA keys are missing
    result = model.load_state_dict(base_sd, strict=False)
    assert set(result.missing_keys) == lora_keys and not result.unexpected_keys


def test_only_lora_parameters_get_gradients():
    model = make_model()
    inject_lora(model, LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]))
    mark_trainable(model)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    logits = model(ids())
    loss = F.cross_entropy(logits.flatten(0, 1), ids(2).flatten())
    loss.backward()
    lora_ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    held = [p for group in opt.param_groups for p in group["params"]]
    assert {id(p) for p in held} == lora_ids and len(held) == len(params) == 2 * 3 * LAYERS
    # B starts at zero, so its gradient is where learning starts
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for _, m in lora_modules(model))


def test_merge_unmerge_and_unload():
    model = make_model()
    inject_lora(model, LoraConfig(r=4, alpha=8))
    perturb_b(model)
    model.eval()
    x = ids()
    base_weights = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        once = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
        merge_lora(model)
        assert all(torch.equal(m.weight, once[n]) for n, m in lora_modules(model))
        assert all(m.merged for _, m in lora_modules(model))
        model.train()
        model.eval()  # train()/eval() never touch weights
        assert all(torch.equal(m.weight, once[n]) for n, m in lora_modules(model))
        unmerge_lora(model)
        unmerge_lora(model)
        for n, m in lora_modules(model):
            assert rel_err(m.weight, base_weights[n]) <= 1e-6, n
            assert not m.merged
        again = model(x)
        merge_lora(model)
        model = merge_and_unload(model)
        unloaded = model(x)
    assert rel_err(merged, unmerged) <= 1e-5
    assert rel_err(again, unmerged) <= 1e-5
    assert rel_err(unloaded, unmerged) <= 1e-5
    assert not lora_modules(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any(".lora_A." in k or ".lora_B." in k for k in model.state_dict())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_gives_back_the_base_bit_for_bit(dtype):
    # W + d - d rounds differently from W; a drifted base changes its fingerprint, and an
    # adapter saved after a merge/unmerge cycle would be refused on its own base.
    from minilora.lora.fingerprint import base_fingerprint

    model = make_model().to(dtype)
    inject_lora(model, LoraConfig(r=4, alpha=8))
    perturb_b(model)
    base = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    fingerprint = base_fingerprint(model)
    for _ in range(3):
        merge_lora(model)
        assert not all(torch.equal(m.weight, base[n]) for n, m in lora_modules(model))
        unmerge_lora(model)
    assert all(torch.equal(m.weight, base[n]) for n, m in lora_modules(model))
    assert base_fingerprint(model) == fingerprint
    merge_lora(model)
    layers = [m for _, m in lora_modules(model)]
    merge_and_unload(model)
    assert all(m._unmerged_weight is None for m in layers)  # no copies kept after unloading


@pytest.mark.parametrize("merge", [merge_lora, merge_and_unload])
def test_merging_into_a_tied_weight_is_refused(merge):
    model = make_model(tie=True)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=["lm_head", "q_proj"]))
    perturb_b(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    weights = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    with pytest.raises(ValueError, match=r"lm_head \(its weight is also model\.embed_tokens"
                                         r"\.weight\)") as info:
        merge(model)
    assert "q_proj" not in str(info.value)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # nothing merged
    assert all(torch.equal(m.weight, weights[n]) and not m.merged for n, m in lora_modules(model))
    untied = make_model(tie=False)
    inject_lora(untied, LoraConfig(r=4, alpha=8, targets=["lm_head", "q_proj"]))
    merge(untied)  # an untied head merges


@pytest.mark.parametrize("merge", [False, True])
def test_disabled_gives_base_output(merge):
    model = make_model()
    x = ids()
    with torch.no_grad():
        base = model(x)
        inject_lora(model, LoraConfig(r=4))
        perturb_b(model)
        if merge:
            merge_lora(model)
        adapted = model(x)
        with disabled(model):
            off = model(x)
        back = model(x)
    assert rel_err(adapted, base) > 1e-3
    assert rel_err(off, base) <= 1e-5
    assert torch.equal(back, adapted)
    assert all(m.enabled for _, m in lora_modules(model))


def test_parameter_count_and_report():
    model = make_model()
    total_before = count_parameters(model).total
    report = inject_lora(model, LoraConfig(r=4, targets="all-linear"))
    expected = sum(4 * (i + o) for _, i, o in report.modules)
    assert report.lora_parameters == expected
    mark_trainable(model)
    counts = count_parameters(model)
    assert counts.lora == counts.trainable == expected
    assert counts.total == total_before + expected
    assert len(report.modules) == 7 * LAYERS  # every Linear but the tied head


def names_of(report) -> set[str]:
    return {n for n, _, _ in report.modules}


def layer_names(*suffixes: str) -> set[str]:
    parts = {
        "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    }
    return {f"model.layers.{i}.{parts[s]}.{s}" for i in range(LAYERS) for s in suffixes}


ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "targets, exclude, tie, expected",
    [
        ("square", [], True, layer_names("q_proj", "o_proj")),
        (["q_proj", "v_proj"], [], True, layer_names("q_proj", "v_proj")),
        (r".*\.(gate|up)_proj", [], True, layer_names("gate_proj", "up_proj")),
        ("all-linear", [], True, layer_names(*ALL_SEVEN)),
        ("all-linear", [], False, layer_names(*ALL_SEVEN)),  # untied, skipped by its name
        ("all-linear", ["mlp.down_proj", "k_proj"],
         True, layer_names("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
        (["q_proj"], r"model\.layers\.0\..*", True, {"model.layers.1.self_attn.q_proj"}),
        (["lm_head"], [], True, {"lm_head"}),  # named explicitly: allowed
        (["model.layers.1.mlp.up_proj"], [], True, {"model.layers.1.mlp.up_proj"}),
    ],
)
def test_targets(targets, exclude, tie, expected):
    model = make_model(tie=tie)
    report = inject_lora(model, LoraConfig(r=2, targets=targets, exclude=exclude))
    assert names_of(report) == expected
    assert {n for n, _ in lora_modules(model)} == expected


def test_square_on_minimind_shapes_is_q_and_o():
    """q_proj/o_proj are 64x64; k/v (64->16) and the MLP (64<->176) are not square."""
    model = make_model()
    report = inject_lora(model, LoraConfig(r=8, targets="square"))
    assert sorted(report.modules) == sorted(
        [(n, HIDDEN, HIDDEN) for n in layer_names("q_proj", "o_proj")]
    )


def test_all_linear_skips_tied_head_under_any_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

    report = inject_lora(Tied(), LoraConfig(r=2, targets="all-linear"))
    assert names_of(report) == {"proj"}


def test_no_match_lists_the_linear_names():
    model = make_model()
    expected = r"'query' \(nearest: .*\) match no Linear.*names end in: q_proj, .*lm_head"
    with pytest.raises(ValueError, match=expected):
        inject_lora(model, LoraConfig(targets=["query"]))


def test_each_listed_suffix_that_matches_nothing_is_named_with_the_nearest():
    model = make_model()
    with pytest.raises(ValueError, match=r"^LoRA targets 'v_prj' \(nearest: v_proj[,)]") as info:
        inject_lora(model, LoraConfig(targets=["q_proj", "v_prj"]))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert not lora_modules(model)  # q_proj was not adapted on its own


def test_inject_twice_is_refused_and_all_linear_skips_lora_internals():
    model = make_model()
    inject_lora(model, LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"already have LoRA.*model\.layers\.0\.self_attn\.q_proj"):
        inject_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    # a second, disjoint injection is fine and never adapts lora_A / lora_B themselves
    report = inject_lora(model, LoraConfig(r=2, targets="all-linear", exclude=["q_proj"]))
    assert not any("lora_" in n for n in names_of(report))
    assert len(lora_modules(model)) == 7 * LAYERS


def test_r_too_large_names_the_layer_and_changes_nothing():
    model = make_model()
    expected = r"r=32 .*model\.layers\.0\.self_attn\.k_proj \(64 -> 16\)"
    with pytest.raises(ValueError, match=expected):
        inject_lora(model, LoraConfig(r=32, targets=["q_proj", "k_proj"]))
    assert not lora_modules(model)


def test_modules_found_by_type_not_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = nn.Linear(8, 8)  # named "lora", but a base layer
            self.fc = nn.Linear(8, 8)

    model = Odd()
    inject_lora(model, LoraConfig(r=2, targets=["fc"]))
    mark_trainable(model)
    assert [n for n, _ in lora_modules(model)] == ["fc"]
    assert not model.lora.weight.requires_grad


# ---------------------------------------------------------------- precision and compile


def test_bf16_autocast():
    model = make_model()
    inject_lora(model, LoraConfig(r=4))
    perturb_b(model)
    x = ids()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2
    mark_trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model))


def test_bf16_base_gets_float32_adapters():
    """A bf16 base (no autocast) gets float32 adapters; output stays bf16 and close to fp32."""
    x = ids()
    ref_model = make_model()
    inject_lora(ref_model, LoraConfig(r=4))
    perturb_b(ref_model)
    model = make_model().to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4))
    model.load_state_dict(ref_model.state_dict())  # copies, casting base weights to bf16
    lin = lora_modules(model)[0][1]
    assert lin.weight.dtype == torch.bfloat16
    assert lin.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ref = ref_model(x)
        out = model(x)
        merge_lora(model)
        merged = model(x)
    assert out.dtype == merged.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2
    assert rel_err(merged, out) < 3e-2


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 8))
    inject_lora(net, LoraConfig(r=2, targets="all-linear"))
    perturb_b(net)
    x = torch.randn(3, 16)
    with torch.no_grad():
        eager = net(x)
        start = time.perf_counter()
        compiled = torch.compile(net)(x)
    assert time.perf_counter() - start < 120
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- LoRA paper, Table 2


@pytest.mark.parametrize(
    "hidden, layers, heads, inter, expected",
    [(768, 12, 12, 3072, 294_912), (1024, 24, 16, 4096, 786_432)],
    ids=["roberta-base", "roberta-large"],
)
def test_roberta_parameter_counts(hidden, layers, heads, inter, expected):
    """r=8 on query and value; built on the meta device (shapes only, no memory, no download)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter,
    )
    with torch.device("meta"):
        model = transformers.RobertaModel(config)
    report = inject_lora(model, LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    mark_trainable(model)
    assert report.lora_parameters == expected
    assert count_parameters(model).lora == count_parameters(model).trainable == expected
    assert len(report.modules) == 2 * layers


# ---------------------------------------------------------------- fast path == reference


def _set_mode(lin: LoRALinear, mode: str) -> None:
    if mode in ("merged", "merged-disabled"):
        lin.merge()
    if mode in ("disabled", "merged-disabled"):
        lin.enabled = False


FAST_CASES = [  # (mode, autocast, dropout, training)
    ("plain", False, 0.0, False), ("plain", True, 0.0, False), ("plain", False, 0.3, True),
    ("plain", True, 0.3, True), ("merged", False, 0.0, False), ("merged", True, 0.0, False),
    ("disabled", False, 0.0, False), ("disabled", True, 0.3, True),
    ("merged-disabled", False, 0.0, False),
]


@pytest.mark.parametrize("mode, autocast, dropout, training", FAST_CASES)
def test_fast_path_equals_the_reference_forward(mode, autocast, dropout, training):
    """forward (the one-node fast path where it applies) == reference_forward, the formula in
    three lines, in fp32 and under bf16 autocast, with dropout (same seed, same mask) and
    without, merged and disabled; and both equal the formula written out here."""
    _, lin = _fused_layer(dropout)
    lin.train(training)
    _set_mode(lin, mode)
    x = torch.randn(4, 5, 12)
    a, b = lin.lora_A["default"].weight.detach(), lin.lora_B["default"].weight.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(7)
        fast = lin(x)
        torch.manual_seed(7)
        ref = lin.reference_forward(x)
    torch.manual_seed(7)
    xd = F.dropout(x, dropout, training=True) if dropout and training else x
    w = lin._unmerged_weight if lin.merged else lin.weight.detach()
    formula = x @ w.T + lin.bias.detach()
    if mode == "plain" or mode == "merged":
        formula = formula + 2.0 * (xd @ a.T) @ b.T
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    assert fast.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast.float(), formula, **tol)


def test_merge_refuses_a_non_finite_result_and_changes_nothing():
    _, lin = _fused_layer()
    with torch.no_grad():
        lin.lora_B["default"].weight[0, 0] = float("inf")
    before = lin.weight.detach().clone()
    with pytest.raises(MergeError, match="inf or NaN"):
        lin.merge()
    assert not lin.merged and torch.equal(lin.weight, before)
    assert isinstance(MergeError("x"), ConfigError)


def test_lora_config_module_does_not_import_torch():
    code = ("import sys, minilora.lora.config as c; c.LoraConfig(r=2); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lora_config_names_every_bad_field_in_one_error():
    with pytest.raises(ConfigError) as caught:
        LoraConfig(r=0, alpha=float("inf"), dropout=-0.5, targets=["q_proj", ""],
                   exclude="square", init="xavier", use_rslora="false", use_dora=1)
    err = caught.value
    assert list(err.problems) == ["r", "alpha", "dropout", "targets", "exclude", "init",
                                  "use_rslora", "use_dora"]
    assert str(err) == "; ".join([
        "LoraConfig.r must be an integer >= 1, got 0",
        "LoraConfig.alpha must be a finite number, got inf",
        "LoraConfig.dropout must be in [0, 1), got -0.5",
        "LoraConfig.targets must be a list of module-name suffixes or a regex string, got "
        "['q_proj', '']",
        "LoraConfig.exclude cannot be 'square'",
        "LoraConfig.init must be one of ('gaussian', 'kaiming', 'pissa'), got 'xavier'",
        "LoraConfig.use_rslora must be a bool, got 'false'",
        "LoraConfig.use_dora must be a bool, got 1",
    ])
    with pytest.raises(ConfigError) as caught:  # one bad field: only it is named
        LoraConfig(r=4, alpha=True)
    assert caught.value.problems == {"alpha": "must be a number > 0, got True"}
    assert str(caught.value) == "LoraConfig.alpha must be a number > 0, got True"
