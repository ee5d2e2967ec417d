"""A mixed batch's gathered path (minilora.lora.stacked): each row gets what the LoRA formula
gives it, with adapters of different ranks and scalings, base rows among them, and the stack
follows every change to the adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minilora.lora.layer import LoRALinear
from minilora.lora.named import mixed_adapters

IN, OUT = 12, 10
# name -> (r, alpha, rsLoRA): three ranks, three scalings (alpha / r, alpha / sqrt(r))
ADAPTERS = {"default": (2, 4.0, False), "mid": (3, 1.5, False), "wide": (5, 7.0, True)}


def layer(dtype: torch.dtype = torch.float32) -> LoRALinear:
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(IN, OUT).to(dtype), r=2, alpha=4.0)
    for name, (r, alpha, rslora) in ADAPTERS.items():
        if name != "default":
            lin.add_adapter(name, r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        for name in ADAPTERS:
            lin.lora_B[name].weight.normal_()  # B starts at zero: give every adapter an update
    return lin


def formula(lin: LoRALinear, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Row i: x W^T + b + s (x A^T) B^T with adapter names[i]'s A, B and s = alpha / r
    (alpha / sqrt(r) with rsLoRA), LoRA's definition; the base alone for None; in float32."""
    w, b = lin.weight.float(), lin.bias.float()
    rows = []
    for row, name in zip(x.float(), names, strict=True):
        y = row @ w.T + b  # (T, out)
        if name is not None:
            r, alpha, rslora = ADAPTERS[name]
            s = alpha / r ** 0.5 if rslora else alpha / r
            a, bb = lin.lora_A[name].weight.float(), lin.lora_B[name].weight.float()
            y = y + s * (row @ a.T) @ bb.T
        rows.append(y)
    return torch.stack(rows)  # (B, T, out)


def routed(lin: LoRALinear, x: torch.Tensor, names: list[str | None],
           check_stacks: bool = True) -> torch.Tensor:
    with torch.no_grad(), mixed_adapters(lin, names, check_stacks=check_stacks):
        return lin(x)


NAMES = ["wide", None, "default", "mid", "wide", None, "mid"]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gathered_rows_equal_the_lora_formula(dtype, tol):
    """float32: rounding only (tolerance 1e-5); a bf16 base with float32 adapters: the base
    product and the output rounded to bf16 (tolerance 2e-2, relative and absolute)."""
    lin = layer(dtype)
    x = torch.randn(len(NAMES), 4, IN).to(dtype)
    got = routed(lin, x, NAMES)
    assert lin.stacked is not None  # the gathered path ran (the loop builds no stack)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), formula(lin, x, NAMES), rtol=tol, atol=tol)
    # the per-adapter loop gives the same rows
    lin.gather_mixed = False
    torch.testing.assert_close(routed(lin, x, NAMES), got, rtol=tol, atol=tol)


def test_the_stack_follows_added_changed_and_deleted_adapters():
    lin = layer()
    x = torch.randn(len(NAMES), 3, IN)
    routed(lin, x, NAMES)
    built = lin.stacked
    assert built is not None and built.names == tuple(ADAPTERS)
    routed(lin, x, NAMES)
    assert lin.stacked is built  # nothing changed: reused

    # trained (an in-place change of B): the next call reads the new weights
    with torch.no_grad():
        lin.lora_B["mid"].weight.mul_(-3.0)
    torch.testing.assert_close(routed(lin, x, NAMES), formula(lin, x, NAMES), rtol=1e-5,
                               atol=1e-5)
    assert lin.stacked is not built

    # added: dropped at once, and the new adapter's rows get its update
    lin.add_adapter("late", r=4, alpha=2.0)
    assert lin.stacked is None
    with torch.no_grad():
        lin.lora_B["late"].weight.normal_()
    ADAPTERS_LATE = {**ADAPTERS, "late": (4, 2.0, False)}
    names = ["late", "default", None, "late"]
    got = routed(lin, x[:4], names)
    want = formula(lin, x[:4], [n if n != "late" else None for n in names])
    a, b = lin.lora_A["late"].weight, lin.lora_B["late"].weight
    for i in (0, 3):
        want[i] += 2.0 / 4 * (x[i] @ a.T) @ b.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert lin.stacked is not None and lin.stacked.names == tuple(ADAPTERS_LATE)

    # deleted: the adapters after it move down a slot; each row still gets its own
    lin.delete_adapter("default")
    assert lin.stacked is None
    names = ["wide", "mid", None, "wide"]
    torch.testing.assert_close(routed(lin, x[:4], names), formula(lin, x[:4], names),
                               rtol=1e-5, atol=1e-5)


def test_a_caller_that_vouches_for_the_weights_skips_the_check_loaders_still_restack():
    """check_stacks=False (the server's engine): an in-place write the caller promised not to
    make is not looked for, while what minilora's loaders and add/delete do still drops the
    stack."""
    lin = layer()
    x = torch.randn(len(NAMES), 3, IN)
    before = routed(lin, x, NAMES, check_stacks=False)
    built = lin.stacked
    with torch.no_grad():
        lin.lora_B["mid"].weight.mul_(-3.0)
    torch.testing.assert_close(routed(lin, x, NAMES, check_stacks=False), before)
    assert lin.stacked is built  # not re-read: the caller vouched
    lin.weights_changed()  # what loading an adapter into the layer says
    torch.testing.assert_close(routed(lin, x, NAMES, check_stacks=False),
                               formula(lin, x, NAMES), rtol=1e-5, atol=1e-5)
    lin.add_adapter("late", r=4, alpha=2.0)
    assert lin.stacked is None


def test_rows_that_need_gradients_take_the_loop_and_train_their_own_adapter():
    """The stack is a copy outside autograd: with gradients on, each adapter's Parameters
    must still get their rows' gradient (what the stack would silently drop)."""
    lin = layer()
    x = torch.randn(3, 2, IN)
    with mixed_adapters(lin, ["mid", "wide", None]):
        lin(x).sum().backward()
    assert lin.stacked is None
    for name in ("mid", "wide"):
        assert lin.lora_B[name].weight.grad is not None
        assert lin.lora_B[name].weight.grad.abs().sum() > 0
    assert lin.lora_B["default"].weight.grad is None


def test_a_dora_adapter_in_the_batch_runs_its_rows_alone_the_others_gathered():
    lin = layer()
    lin.add_adapter("dora", r=2, alpha=4.0, use_dora=True)
    with torch.no_grad():
        lin.lora_B["dora"].weight.normal_()
    x = torch.randn(4, 3, IN)
    names = ["dora", "mid", None, "wide"]
    got = routed(lin, x, names)
    assert lin.stacked is not None  # mid and wide were gathered
    torch.testing.assert_close(got[1:], formula(lin, x[1:], names[1:]), rtol=1e-5, atol=1e-5)
    lin.set_active(["dora"])
    with torch.no_grad():
        alone = lin(x[:1])
    torch.testing.assert_close(got[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("check_stacks", [True, False])
def test_adapters_loaded_under_inference_mode_are_restacked_when_swapped(tmp_path, check_stacks):
    """What the server does: adapters loaded in its engine's thread (inference mode, where
    tensors have no version counter), then one swapped in place for another file."""
    from helpers import tiny_model
    from minilora.adapters.folder import load_adapter, save_adapter
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig, lora_modules

    maker = tiny_model(96)
    folders = {}
    for i, name in enumerate(("p", "q", "p2")):
        inject_lora(maker, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), name=name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, m in lora_modules(maker):
                m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape,
                                                        generator=gen))
        folders[name] = save_adapter(maker, tmp_path / name, name=name)
    model = tiny_model(96).eval()
    x = torch.randint(0, 96, (3, 5))
    names = ["p", None, "q"]
    with torch.inference_mode():
        load_adapter(model, folders["p"], name="p")
        load_adapter(model, folders["q"], name="q")
        with mixed_adapters(model, names, check_stacks=check_stacks):
            first = model(x).logits
        assert all(m.stacked is not None for _, m in lora_modules(model))
        load_adapter(model, folders["p2"], name="p")  # the same slot, new weights
        with mixed_adapters(model, names, check_stacks=check_stacks):
            swapped = model(x).logits
        for _, m in lora_modules(model):
            m.gather_mixed = False
        looped = model(x, adapter_names=names).logits
    torch.testing.assert_close(swapped, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped[0], first[0], atol=1e-3)  # row "p" did change


def test_the_last_batchs_gathered_rows_are_kept_only_while_its_slots_stay():
    """A server decodes the same rows step after step: their gathered A and B are kept (no
    larger than the stack) and follow any change of the rows' adapters or of the stack."""
    lin = layer()
    x = torch.randn(4, 1, IN)
    names = ["wide", None, "default", "mid"]
    torch.testing.assert_close(routed(lin, x, names), formula(lin, x, names), rtol=1e-5,
                               atol=1e-5)
    stack = lin.stacked
    assert stack is not None and len(stack.picked) == 1
    kept = next(iter(stack.picked.values()))
    routed(lin, x, names)
    assert next(iter(stack.picked.values())) is kept  # the same rows: reused
    swapped = ["mid", "wide", None, "default"]
    torch.testing.assert_close(routed(lin, x, swapped), formula(lin, x, swapped), rtol=1e-5,
                               atol=1e-5)
    assert len(stack.picked) == 1 and next(iter(stack.picked.values())) is not kept
    with torch.no_grad():
        lin.lora_B["mid"].weight.add_(1.0)  # a new stack, with nothing kept from the old
    torch.testing.assert_close(routed(lin, x, swapped), formula(lin, x, swapped), rtol=1e-5,
                               atol=1e-5)
    assert lin.stacked is not stack
    many = ["mid"] * 3 + ["wide"] * 3  # more rows than the stack's 4 slots: gathered anew
    x6 = torch.randn(6, 1, IN)
    torch.testing.assert_close(routed(lin, x6, many), formula(lin, x6, many), rtol=1e-5,
                               atol=1e-5)
    assert not lin.stacked.picked


def test_a_transformers_model_routes_rows_the_way_the_server_does():
    """The routing knows no model: a transformers Llama with three adapters (one DoRA), mixed
    rows gathered with the server's unchecked stacks, and a batch of one adapter, each equal to
    that adapter set active (the reference: one adapter at a time, nothing routed)."""
    from helpers import add_random_adapter, tiny_llama
    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig, lora_modules
    from minilora.lora.named import set_active

    hf = tiny_llama(64, tied=False)
    add_random_adapter(hf, "p", 1, "all-linear")
    add_random_adapter(hf, "q", 2, ["q_proj", "v_proj", "down_proj"])
    inject_lora(hf, LoraConfig(r=2, targets=["o_proj"], use_dora=True), name="d")
    with torch.no_grad():
        for _, m in lora_modules(hf):
            if "d" in m.lora_A:
                m.lora_B["d"].weight.normal_()
    set_active(hf, None)
    x = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))

    def alone(name: str | None, rows: torch.Tensor) -> torch.Tensor:
        set_active(hf, name)
        try:
            with torch.no_grad():
                return hf(rows).logits
        finally:
            set_active(hf, None)

    names = ["q", None, "p", "d"]
    with torch.inference_mode(), mixed_adapters(hf, names, check_stacks=False):
        mixed = hf(x).logits
    assert any(m.stacked is not None for _, m in lora_modules(hf))  # gathered
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i:i + 1], alone(name, x[i:i + 1]), rtol=1e-5,
                                   atol=1e-5)
    for name in ("p", "d"):
        with torch.no_grad(), mixed_adapters(hf, [name] * 4):
            every = hf(x).logits
        torch.testing.assert_close(every, alone(name, x), rtol=1e-6, atol=1e-6)
