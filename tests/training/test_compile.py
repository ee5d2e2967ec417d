"""training/compiled.py: the compiled training step equals the eager one and compiles once, across
steps of different lengths, adapter switches and a resume.

The compiled rows use torch.compile's "aot_eager" backend (dynamo's trace plus AOTAutograd's
joint forward/backward graph, run by eager kernels): what recompiles and what breaks the graph
is decided there, identically for inductor, in a fraction of inductor's compile time on 2 cores;
benchmarks/compile.py runs inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig
from minilora.lora.named import set_active
from minilora.training.compiled import CompiledLoss, padded_length
from minilora.training.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them with
    AOTAutograd on eager kernels (so backward is a compiled graph too)."""

    def __init__(self) -> None:
        self.graphs = 0
        self._aot = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot(gm, example_inputs)


def lora_model(seed: int = 0) -> nn.Module:
    model = tiny_model(VOCAB, seed=seed)
    for name in ("default", "two"):
        inject_lora(model, LoraConfig(r=2, alpha=4.0, targets="all-linear"), name=name)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # B != 0, so the A gradients are not zero and the update is seen
        for p in lora_parameters(model, "default") + lora_parameters(model, "two"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    set_active(model, "default")
    mark_trainable(model)
    return model.train()


def batch(length: int, seed: int, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 3] = -100  # a prompt, not counted
    labels[0, length - 2:] = -100  # a shorter row's right padding
    return ids, labels


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("length", "expected"), [(1, 8), (8, 8), (9, 16), (100, 104)])
def test_a_batch_pads_to_the_next_multiple_of_eight(length, expected):
    assert padded_length(length) == expected


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_steps_equal_eager_steps(packed):
    eager_model = lora_model()
    compiled_model = copy.deepcopy(eager_model)
    step = CompiledLoss(compiled_model, 64, backend="aot_eager")
    opts = [torch.optim.AdamW(lora_parameters(m), lr=1e-2) for m in (eager_model, compiled_model)]
    for i, length in enumerate((20, 13, 27)):  # each padded differently
        ids, labels = batch(length, seed=i)
        segments = None
        if packed:  # two samples per row, then the row's padding
            segments = torch.ones_like(ids)
            segments[:, length // 2:] = 2
            segments[0, length - 2:] = 0
        eager = eager_model(ids, labels=labels, segment_ids=segments).loss
        loss = step(ids, labels, segment_ids=segments).loss
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
        eager.backward()
        loss.backward()
        eager_grads, compiled_grads = grads(eager_model), grads(compiled_model)
        assert eager_grads.keys() == compiled_grads.keys()
        assert all("lora_" in n for n in eager_grads) and len(eager_grads) == 2 * 7 * 2
        for name, g in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_one_graph_across_steps_lengths_adapter_switches_and_a_reload():
    model = lora_model()
    backend = Counting()
    step = CompiledLoss(model, 64, backend=backend)
    counters.clear()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for i, length in enumerate((9, 31, 17, 2)):
        ids, labels = batch(length, seed=i)
        step(ids, labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert backend.graphs == 1  # one graph for every length
    assert not counters["graph_break"]  # the LoRA node included: one graph, no break

    set_active(model, "two")
    mark_trainable(model)
    ids, labels = batch(24, seed=9)
    loss = step(ids, labels).loss
    torch.testing.assert_close(loss, model(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".two" in n or "two." in n for n in trained), trained
    assert backend.graphs == 1  # a switched adapter of the same shape reuses the graph

    # A resume loads the checkpoint into the same parameters in place
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in lora_parameters(model, "two"):
            p.add_(1.0)
    model.load_state_dict(saved, strict=False)
    step(ids, labels).loss.backward()
    assert backend.graphs == 1

    ids, labels = batch(60, seed=3)  # up to max_seq_len, the same graph
    step(ids, labels).loss.backward()
    assert backend.graphs == 1


def test_train_with_compile_equals_eager_and_compiles_once_through_a_resume(tok, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4))
    base = dict(data=str(data), lora_r=4, lora_alpha=8.0, batch_size=4, lr=1e-2,
                max_seq_len=32, amp_dtype="float32", log_every=1, seed=0, max_steps=4,
                save_every=2)

    def run(out: str, backend=None, **changes):
        return fit(tiny_model(tok.vocab_size), tok,
                   TrainConfig(**{**base, "out_dir": str(tmp_path / out), **changes}),
                   compile_backend=backend)

    eager = run("eager")
    backend = Counting()
    first = run("compiled", backend, compile=True, stop_after=2)
    assert backend.graphs == 1
    second = run("compiled", backend, compile=True, resume=True)
    # The resumed run (a new model, its checkpoint loaded) compiles once, as a
    # fresh process would, and never again over its steps.
    assert backend.graphs == 2
    losses = [loss for _, loss in first.losses + second.losses]
    assert losses == pytest.approx([loss for _, loss in eager.losses], rel=1e-5, abs=1e-6)
