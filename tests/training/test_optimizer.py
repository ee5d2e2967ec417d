"""LoRA+ (training/optimizer.py): the parameter groups PEFT's create_loraplus_optimizer builds,
the schedule applied to each group, and bad ratios refused through the command line."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from peft.optimizers import create_loraplus_optimizer

from helpers import chat_rows, fit, tiny_model, write_jsonl
from minilora.lora.injection import inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig
from minilora.training.config import TrainConfig
from minilora.training.optimizer import build_optimizer

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _hf() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL))


def _groups(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[tuple]:
    """Each non-empty group as (sorted parameter names, lr, weight decay)."""
    return sorted((tuple(sorted(names[id(p)] for p in g["params"])), g["lr"], g["weight_decay"])
                  for g in optimizer.param_groups if g["params"])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_loraplus_groups_equal_peft(dora: bool):
    """The same transformers model, targets and ratio: our groups hold the same parameters at
    the same learning rates and weight decay as PEFT's create_loraplus_optimizer."""
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(_hf(), peft.LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=targets, use_dora=dora))
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=3e-4,
                                         loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01)
    # PEFT keeps DoRA's magnitude in a module (`...lora_magnitude_vector.default.weight`),
    # minilora in a ParameterDict (`...lora_magnitude_vector.default`): the same parameter
    peft_names = {id(p): n.removeprefix("base_model.model.").replace(
        "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
        for n, p in theirs.named_parameters()}

    ours = _hf()
    inject_lora(ours, LoraConfig(r=4, alpha=8, targets=targets, use_dora=dora))
    mark_trainable(ours)
    config = TrainConfig(lr=3e-4, weight_decay=0.01, loraplus_lr_ratio=16.0)
    our_opt = build_optimizer(ours, lora_parameters(ours), config)
    our_names = {id(p): n for n, p in ours.named_parameters()}

    want = _groups(peft_opt, peft_names)
    assert len(want) == 2 and {lr for _, lr, _ in want} == {3e-4, 3e-4 * 16}
    assert _groups(our_opt, our_names) == want


def test_without_a_ratio_one_group_at_lr():
    model = tiny_model(64)
    inject_lora(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    mark_trainable(model)
    opt = build_optimizer(model, lora_parameters(model), TrainConfig(lr=1e-3))
    # A and B of q_proj in 2 layers
    assert [(len(g["params"]), g["lr"]) for g in opt.param_groups] == [(4, 1e-3)]


def test_the_schedule_scales_each_group_by_its_ratio(tmp_path, tok):
    """A run with LoRA+: the checkpointed optimizer holds A's group at the schedule's rate
    and B's at ratio times it; a resume with another ratio is refused as another run."""
    from minilora.training.loop import lr_at

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4))
    config = TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), max_steps=3,
                         batch_size=4, max_seq_len=64, lora_r=2, lr=1e-3, warmup_steps=2,
                         loraplus_lr_ratio=8.0, lora_targets=["q_proj", "v_proj"])
    result = fit(tiny_model(tok.vocab_size), tok, config)
    assert result.steps == 3
    state = torch.load(result.checkpoint_dir / "state.pt", weights_only=True)
    rates = [(len(g["params"]), g["lr"]) for g in state["optimizer"]["param_groups"]]
    want = lr_at(2, config, 3)  # the rate of the last step (from 0)
    assert [n for n, _ in rates] == [4, 4]  # A of q and v in 2 layers; B of the same
    assert math.isclose(rates[0][1], want) and math.isclose(rates[1][1], 8 * want)


@pytest.mark.parametrize("ratio,words", [
    ("0", "expected a finite number > 0, got 0.0"),
    ("-2", "expected a finite number > 0, got -2.0"),
    ("nan", "--loraplus-lr-ratio"),
    ("inf", "--loraplus-lr-ratio"),
])
def test_a_bad_ratio_is_one_line_exit_2(tmp_path, tok, capsys, ratio, words):
    from minilora.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--loraplus-lr-ratio", ratio])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_loraplus_with_full_is_refused(tmp_path, capsys):
    from minilora.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "out"), "--full",
                 "--loraplus-lr-ratio", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "--full trains no LoRA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_loraplus_groups_equal_peft_with_lora_on_the_embedding():
    """PEFT's create_loraplus_optimizer puts an embedding's A and B in a group of their own at
    loraplus_lr_embedding (1e-6 by default): so does ours, the Linear A and B as before."""
    targets = ["embed_tokens", "q_proj", "v_proj"]
    theirs = peft.get_peft_model(_hf(), peft.LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=targets))
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=3e-4,
                                         loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01)
    # PEFT's lora_embedding_A.default is minilora's lora_A.default.weight (the same tensor)
    peft_names = {id(p): n.removeprefix("base_model.model.").replace(
        "lora_embedding_A.default", "lora_A.default.weight").replace(
        "lora_embedding_B.default", "lora_B.default.weight")
        for n, p in theirs.named_parameters()}
    ours = _hf()
    inject_lora(ours, LoraConfig(r=4, alpha=8, targets=targets))
    mark_trainable(ours)
    config = TrainConfig(lr=3e-4, weight_decay=0.01, loraplus_lr_ratio=16.0)
    our_opt = build_optimizer(ours, lora_parameters(ours), config)
    our_names = {id(p): n for n, p in ours.named_parameters()}

    want = _groups(peft_opt, peft_names)
    assert (("model.embed_tokens.lora_A.default.weight",
             "model.embed_tokens.lora_B.default.weight"), 1e-6, 0.01) in want
    assert _groups(our_opt, our_names) == want


def test_a_run_with_lora_on_the_embedding_trains_it_and_saves_peft_s_keys(tmp_path, tok):
    """Through the training loop: the embedding's A (zero at the start) and B move, the table
    does not, and the adapter holds PEFT's lora_embedding_A / lora_embedding_B."""
    from safetensors import safe_open

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(repeat=4))
    config = TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), max_steps=3,
                         batch_size=4, max_seq_len=64, lora_r=2, lr=1e-2,
                         lora_targets=["embed_tokens", "q_proj"])
    model = tiny_model(tok.vocab_size)
    table = model.model.embed_tokens.weight.detach().clone()
    result = fit(model, tok, config)
    assert result.output_dir is not None
    emb = model.model.embed_tokens
    assert emb.lora_A["default"].weight.abs().max() > 1e-3
    assert torch.equal(emb.weight, table)
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.model.embed_tokens.lora_embedding_A")
        b = f.get_tensor("base_model.model.model.embed_tokens.lora_embedding_B")
    assert torch.equal(a, emb.lora_A["default"].weight.detach())
    assert torch.equal(b, emb.lora_B["default"].weight.detach())
