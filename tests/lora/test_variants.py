"""LoRA variants (lora/variants.py): a variant declares whether the fast kernel computes it, and
the layer follows that declaration, not a test for DoRA."""

from __future__ import annotations

import torch
from torch import nn

from minilora.lora.layer import LoRALinear
from minilora.lora.variants import DoraVariant, LoraVariant, PissaVariant, variant_for


class _Doubled(LoraVariant):
    """A made-up variant off the fast path: twice the plain update."""

    fast_path = False

    def update(self, layer, adapter, xa, lora, base):
        return 2 * lora


def _layer() -> LoRALinear:
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(12, 8).requires_grad_(False), r=2, alpha=4.0)
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
    return lin


def test_each_adapter_gets_its_variant_and_its_declarations():
    assert type(variant_for("gaussian", False)) is LoraVariant
    assert type(variant_for("pissa", False)) is PissaVariant
    dora = variant_for("pissa", True)
    assert type(dora) is DoraVariant and type(dora.start) is PissaVariant
    assert LoraVariant.fast_path and PissaVariant.fast_path and not DoraVariant.fast_path
    assert LoraVariant.adds_up and not DoraVariant.adds_up


def test_the_layer_takes_the_fast_path_only_where_the_variant_says():
    lin = _layer()
    x = torch.randn(3, 12, requires_grad=True)
    a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    plain = x @ lin.weight.T + lin.bias + lin.scaling["default"] * (x @ a.T) @ b.T
    y = lin(x)
    assert "_LowRankLinear" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, plain)
    lin.variant["default"] = _Doubled()
    lin.set_active(["default"])  # what the fast path reads is set with the active adapters
    y = lin(x)
    assert "_LowRankLinear" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, plain + lin.scaling["default"] * (x @ a.T) @ b.T)
    assert lin.fused_parts(x) is None  # a fused group runs this layer on its own too
