"""No hidden state: train() leaves the caller's RNG as it found it, fusion is a model's setting,
the LoRA layer declares the state it needs (no attributes stuck on the user's model), every
error class lives in core/errors.py, and a programming mistake is a plain ValueError."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.core.errors import MiniloraError
from minilora.lora.injection import inject_lora
from minilora.lora.layer import LoraConfig, lora_modules
from minilora.lora.named import mixed_adapters
from minilora.training.config import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "minilora"


def test_train_leaves_the_callers_rng_as_it_found_it_and_stays_reproducible(tok, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=2))

    def run(out: str, caller_seed: int):
        # dropout: every step draws from the generator train() seeds
        config = TrainConfig(data=str(data), out_dir=str(tmp_path / out), lora_r=4,
                             lora_alpha=8.0, lora_dropout=0.1, batch_size=4, max_seq_len=64,
                             amp_dtype="float32", seed=3, max_steps=3, log_every=1)
        model = tiny_model(tok.vocab_size)  # (it seeds the generator itself)
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        result = fit(model, tok, config)
        assert torch.equal(torch.random.get_rng_state(), before)
        return result

    first = run("a", 1234)
    second = run("b", 99)  # another caller state: the run does not depend on it
    assert first.losses == second.losses and len(first.losses) == 3


def _stray_attributes(obj: object) -> list[str]:
    return [k for k in vars(obj) if "minilora" in k.lower()]


def test_lora_state_is_declared_on_the_layer_not_stuck_on_the_model():
    torch.manual_seed(0)
    model = tiny_model(96)
    inject_lora(model, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], init="pissa"),
                name="p")
    inject_lora(model, LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), name="b")
    layers = [m for _, m in lora_modules(model)]
    digests = {m.pissa_from["p"] for m in layers}
    assert len(digests) == 1 and all("b" not in m.pissa_from for m in layers)
    ids = torch.randint(0, 96, (2, 5))
    with mixed_adapters(model, ["p", "b"]):
        assert all(m.routes is not None for m in layers)
        model(ids)
    model(ids, adapter_names=["b", None])
    assert all(m.routes is None for m in layers)
    stray = [(n, a) for n, m in [("", model), *model.named_modules()]
             for a in _stray_attributes(m)]
    assert stray == []


def test_fusion_is_a_setting_of_each_model_not_of_the_process():
    import minilora.model.fused as fused

    assert not hasattr(fused, "_ENABLED") and not hasattr(fused, "fusion")
    import minilora.training.compiled as compiled

    assert not hasattr(compiled, "BACKEND")


def test_every_error_class_is_in_core_errors():
    """A public exception class anywhere else would be a second place to look for them.
    Private control-flow exceptions (a leading underscore) and the server's HTTP answer (which
    carries an HTTP status, not a minilora error) are the exceptions."""
    allowed = {("serve/app.py", "APIError")}
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "core/errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.endswith(("Error", "Exception", "Mismatch")) for b in bases):
                    if (rel, node.name) not in allowed:
                        found.append(f"{rel}: {node.name}")
    assert found == []


def test_a_wrong_shaped_tensor_is_a_programming_mistake_not_a_user_error():
    model = tiny_model(96)
    ids = torch.randint(0, 96, (2, 5))
    with pytest.raises(ValueError, match="labels shape") as caught:
        model(ids, labels=ids[:, :3])
    assert not isinstance(caught.value, MiniloraError)
    with pytest.raises(ValueError, match="attention_mask shape") as caught:
        model(ids, attention_mask=torch.ones(2, 3, dtype=torch.bool))
    assert not isinstance(caught.value, MiniloraError)
