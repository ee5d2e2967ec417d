"""Preference tuning (training/preference.py, data/preference.py): the log-probs against full
logits, the DPO and IPO losses, rewards and LoRA gradients against TRL's DPOTrainer with PEFT,
the label-smoothed and SimPO losses against their papers' formulas, the pair files, and a run
(resume, accumulation, activation checkpointing, --from-adapter) through the loop.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import CHATS, chat_rows, fit, tiny_model, write_jsonl
from minilora.adapters.folder import load_adapter, save_adapter
from minilora.core.errors import AdapterError, DataError
from minilora.data.preference import load_pairs
from minilora.data.sft import Batch, load_jsonl
from minilora.lora.injection import disabled, inject_lora, lora_parameters, mark_trainable
from minilora.lora.layer import LoraConfig, lora_modules
from minilora.lora.named import list_adapters
from minilora.model.io import save_model
from minilora.model.loss import linear_log_probs
from minilora.training import run_log
from minilora.training.config import TrainConfig
from minilora.training.preference import (
    METRICS,
    REFERENCE,
    PreferenceLoss,
    preference_losses,
    sequence_log_probs,
    start_from_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WRONG = "I do not know."


def pair_rows() -> list[dict]:
    """MiniMind's DPO format: each chat's last answer chosen, a fixed wrong one rejected."""
    return [{"chosen": chat, "rejected": chat[:-1] + [{"role": "assistant", "content": WRONG}]}
            for chat in CHATS]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows() * 2)


def config(tmp_path, data, **changes) -> TrainConfig:
    settings = dict(data=str(data), out_dir=str(tmp_path / "run"), method="dpo", max_steps=4,
                    batch_size=3, lr=5e-3, log_every=1, max_seq_len=64, amp_dtype="float32",
                    seed=0)
    return TrainConfig(**{**settings, **changes})


def load_file_keys(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors")).keys()


def adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Log-probs through the chunked head
# ---------------------------------------------------------------------------------------------


def test_chunked_log_probs_and_gradients_equal_a_full_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (11,))
    g = torch.randn(11)  # a different weight per row, as a preference loss gives
    got = linear_log_probs(h, w, b, t, rows=3)  # 4 chunks, the last one short
    (got * g).sum().backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    want = F.log_softmax(h @ w.T + b, dim=-1).gather(1, t[:, None])[:, 0]
    (want * g).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(grads, (h.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_sequence_log_probs_equal_a_log_softmax_gather_over_full_logits(tok):
    model = tiny_model(tok.vocab_size)
    inject_lora(model, LoraConfig(r=2, targets="all-linear"))
    torch.manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    labels[2, 6:] = -100
    got, _ = sequence_log_probs(model, ids, labels)
    logits = model(ids).logits  # (B, T, V), whole
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    want = torch.zeros(3)
    for row in range(3):
        for t in range(8):
            if labels[row, t + 1] != -100:
                want[row] += logps[row, t, labels[row, t + 1]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and its gradient reaches the adapter (B = 0 at init: A's gradient is zero, B's is not)
    got.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


# ---------------------------------------------------------------------------------------------
# Against TRL's DPOTrainer with PEFT
# ---------------------------------------------------------------------------------------------

TRL_ROWS = [{"prompt": "What is your name?", "chosen": "I am Mini.", "rejected": WRONG},
            {"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5.", "rejected": "It is 7, or so."},
            {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."}]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def trl_setup(tok, tmp_path_factory):
    """A tiny transformers Llama, saved so minilora loads the same base, and a transformers
    tokenizer of the tiny vocabulary for TRL."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    root = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        hf.model.embed_tokens.weight.normal_(0, 0.2)  # logits with room to move
    hf.save_pretrained(root / "base")
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok._tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return root, hf_tok


def set_lora_b(model, adapter_name: str, seed: int) -> None:
    """Non-zero B for one PEFT adapter (seeded), so that adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def trl_step(trl_setup, tmp_path, loss_type: str, beta: float, reference: str):
    """TRL's loss, metrics and LoRA gradients on its own first batch of TRL_ROWS; the adapters
    it trained with saved under tmp_path / "adapters" (the reference one, TRL's "ref", in its
    subfolder).

    reference "base": a plain model and a peft_config, so TRL's reference is the adapter
    disabled. reference "adapter": a PeftModel with a trained adapter, which TRL copies into a
    frozen "ref" adapter (its behaviour for a pretrained adapter); the trained copy is then
    moved away from it so the policy differs from the reference.
    """
    import peft
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    root, hf_tok = trl_setup
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type],
                     report_to=[], per_device_train_batch_size=3, use_cpu=True, bf16=False,
                     save_strategy="no")
    rows = Dataset.from_list(TRL_ROWS)
    if reference == "base":
        trainer = DPOTrainer(model=hf, args=args, train_dataset=rows, processing_class=hf_tok,
                             peft_config=lora)
    else:
        policy = peft.get_peft_model(hf, lora)
        set_lora_b(policy, "default", seed=3)
        trainer = DPOTrainer(model=policy, args=args, train_dataset=rows,
                             processing_class=hf_tok)
        assert "ref" in trainer.model.peft_config
    set_lora_b(trainer.model, "default", seed=4)
    trainer.model.save_pretrained(tmp_path / "adapters")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n.removeprefix("base_model.model."): p.grad.clone()
             for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return batch, float(loss.detach()), metrics, grads


@pytest.mark.parametrize("loss_type,beta,reference", [
    ("sigmoid", 0.1, "base"), ("sigmoid", 0.5, "adapter"), ("ipo", 0.1, "base")])
def test_dpo_loss_rewards_and_gradients_equal_trl_dpo_trainer_with_peft(
        trl_setup, tmp_path, loss_type, beta, reference):
    from minilora.lora.named import set_active
    from minilora.model.io import load_model

    batch, trl_loss, trl_metrics, trl_grads = trl_step(trl_setup, tmp_path, loss_type, beta,
                                                       reference)
    assert abs(trl_metrics["rewards/margins"]) > 1e-3  # the policy is not the reference

    model = load_model(trl_setup[0] / "base")
    if reference == "adapter":
        load_adapter(model, tmp_path / "adapters" / "ref", name=REFERENCE)
    load_adapter(model, tmp_path / "adapters")
    set_active(model, ["default"])
    mark_trainable(model)
    model.train()
    # The same tensors TRL trained on: its chosen rows then its rejected rows, its completion
    # mask as the labels.
    ids = batch["input_ids"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    ours = Batch(ids, labels, int(batch["attention_mask"].sum()), int((labels != -100).sum()))
    cfg = TrainConfig(method="dpo", beta=beta, dpo_loss=loss_type)
    summed, _, sums = PreferenceLoss(cfg, REFERENCE if reference == "adapter" else None)(
        model, ours)
    loss = summed / 3
    loss.backward()

    assert float(loss) == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    means = dict(zip(METRICS, (sums / 3).tolist(), strict=True))
    assert means["rewards/chosen"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert means["rewards/rejected"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    assert means["rewards/accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"])
    assert means["rewards/margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    compared = 0
    for path, m in lora_modules(model):
        for kind in ("lora_A", "lora_B"):
            theirs = trl_grads[f"{path}.{kind}.default.weight"]
            mine = getattr(m, kind)["default"].weight.grad
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4)
            compared += 1
            if reference == "adapter":  # frozen on both sides
                assert getattr(m, kind)[REFERENCE].weight.grad is None
                assert f"{path}.{kind}.ref.weight" not in trl_grads
    assert compared == 2 * len(TARGETS) * 2  # every adapted layer of both blocks


def test_label_smoothed_dpo_and_simpo_equal_their_papers_formulas():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) * 4 for _ in range(4))
    nc, nr = torch.tensor([3., 7., 1., 4., 9.]), torch.tensor([5., 2., 6., 1., 3.])
    beta, eps, gamma = 0.3, 0.2, 0.7

    # Conservative DPO (Mitchell 2023): with eps of the labels flipped, the expected loss.
    cfg = TrainConfig(method="dpo", beta=beta, label_smoothing=eps)
    losses, chosen_r, rejected_r = preference_losses(cfg, pc, pr, rc, rr, nc, nr)
    h = beta * ((pc - rc) - (pr - rr))
    want = -(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))
    torch.testing.assert_close(losses, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen_r, beta * (pc - rc))
    torch.testing.assert_close(rejected_r, beta * (pr - rr))

    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log
    # pi(y_l|x) - gamma); no reference.
    cfg = TrainConfig(method="simpo", beta=beta, simpo_gamma=gamma)
    losses, chosen_r, rejected_r = preference_losses(cfg, pc, pr, None, None, nc, nr)
    want = -torch.log(torch.sigmoid(beta / nc * pc - beta / nr * pr - gamma))
    torch.testing.assert_close(losses, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen_r, beta / nc * pc)


def test_simpo_through_the_model_is_its_formula_over_full_logits(tok, tmp_path, pairs_file):
    model = tiny_model(tok.vocab_size)
    inject_lora(model, LoraConfig(r=2))
    pairs = load_pairs(pairs_file, tok, 64)
    batch = pairs.collate([0, 1, 2])
    cfg = TrainConfig(method="simpo")  # beta 2.0, gamma 1.0
    summed, _, _ = PreferenceLoss(cfg)(model, batch)
    logps = torch.log_softmax(model(batch.input_ids).logits[:, :-1].float(), -1)
    targets = batch.labels[:, 1:]
    counted = targets != -100
    picked = logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * counted
    mean = picked.sum(-1) / counted.sum(-1)  # per-token mean log-prob of each answer
    want = -F.logsigmoid(2.0 * mean[:3] - 2.0 * mean[3:] - 1.0).sum()
    assert float(summed) == pytest.approx(float(want), abs=1e-5)


def test_the_reference_is_the_disabled_adapter_and_gets_no_graph(tok, pairs_file):
    model = tiny_model(tok.vocab_size)
    inject_lora(model, LoraConfig(r=2))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["default"].weight.normal_(0, 0.5)
    batch = load_pairs(pairs_file, tok, 64).collate([0, 1])
    loss = PreferenceLoss(TrainConfig(method="dpo"))
    ref = loss.reference_log_probs(model, batch)
    with disabled(model), torch.no_grad():
        base, _ = sequence_log_probs(model, batch.input_ids, batch.labels)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, base)
    policy, _ = sequence_log_probs(model, batch.input_ids, batch.labels)
    assert not torch.allclose(policy, ref)  # the adapter is back on after the reference pass


# ---------------------------------------------------------------------------------------------
# Pair files
# ---------------------------------------------------------------------------------------------


def test_the_pair_formats_read_alike_and_are_named_per_file(tok, tmp_path):
    chat = CHATS[1]
    minimind = {"chosen": chat, "rejected": chat[:-1] + [{"role": "assistant",
                                                           "content": WRONG}]}
    trl_strings = {"prompt": chat[0]["content"], "chosen": chat[1]["content"], "rejected": WRONG}
    trl_chats = {"prompt": chat[:1], "chosen": chat[1:],
                 "rejected": [{"role": "assistant", "content": WRONG}]}
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [minimind])
    write_jsonl(folder / "b.jsonl", [trl_strings])
    (folder / "c.json").write_text(json.dumps([trl_chats]))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([trl_strings]), folder / "d.parquet")
    data = load_pairs(folder, tok, 64)
    assert len(data) == 4
    first = data.samples[0]
    for pair in data.samples[1:]:  # the same tokens and labels, whatever the format
        assert pair.chosen == first.chosen and pair.rejected == first.rejected
    assert data.stats.formats == {
        str(folder / "a.jsonl"): {"chosen/rejected conversations": 1},
        str(folder / "b.jsonl"): {"prompt/chosen/rejected": 1},
        str(folder / "c.json"): {"prompt/chosen/rejected": 1},
        str(folder / "d.parquet"): {"prompt/chosen/rejected": 1}}
    # only the answer is trained: its tokens and its end of turn, as the SFT mask has them
    ids, mask = tok.encode_chat(chat)
    assert first.chosen.input_ids == ids
    assert [t for t in first.chosen.labels if t != -100] == [
        t for t, m in zip(ids, mask, strict=True) if m]
    batch = data.collate([0, 1])
    assert batch.input_ids.shape[0] == 4  # chosen, chosen, rejected, rejected
    assert batch.input_ids[0].tolist()[:len(ids)] == ids


def test_only_the_last_answer_of_a_multi_turn_pair_is_trained(tok, tmp_path):
    chat = CHATS[2]  # two assistant turns
    row = {"chosen": chat, "rejected": chat[:-1] + [{"role": "assistant", "content": "9"}]}
    pair = load_pairs(write_jsonl(tmp_path / "p.jsonl", [row]), tok, 128).samples[0]
    trained = [t for t in pair.chosen.labels if t != -100]
    assert tok.decode(trained) == chat[-1]["content"]


@pytest.mark.parametrize("row,field,said", [
    ({"chosen": CHATS[1], "rejected": [{"role": "user", "content": "Who made them?"},
                                       {"role": "assistant", "content": WRONG}]},
     "rejected[0]", "the prompt differs from chosen's (message 1)"),
    ({"chosen": CHATS[1], "rejected": CHATS[1][:1] + [{"role": "assistant", "content": " "}]},
     "rejected[1].content", "an empty answer"),
    ({"chosen": CHATS[1], "rejected": CHATS[1]}, "rejected", "the same answer as chosen's"),
    ({"chosen": "a", "rejected": "b"}, "chosen", "a string without a 'prompt'"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "chosen", "an empty answer"),
    ({"chosen": CHATS[1][:1], "rejected": CHATS[1]}, "chosen[0].role",
     "the last message is a user message"),
    ({"conversations": CHATS[1]}, None, "an SFT record, not a preference pair"),
])
def test_bad_pairs_name_file_line_and_field(tok, tmp_path, row, field, said):
    path = write_jsonl(tmp_path / "p.jsonl", [pair_rows()[0], row])
    with pytest.raises(DataError) as err:
        load_pairs(path, tok, 64)
    assert err.value.line == 2 and err.value.field == field
    assert said in str(err.value) and str(path) in str(err.value)


def test_skip_bad_skips_and_counts_bad_pairs(tok, tmp_path):
    rows = [pair_rows()[0], {"chosen": CHATS[1], "rejected": CHATS[1]}, "{not json",
            pair_rows()[1]]
    data = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tok, 64, skip_bad=True)
    assert len(data) == 2 and data.stats.skipped_bad == 2
    assert "p.jsonl:2: field 'rejected': the same answer" in data.stats.errors[0]


def test_a_long_pair_has_its_answers_cut_never_its_prompt(tok, tmp_path):
    long_answer = "The minilora team made me. " * 20
    row = {"prompt": "Who made you?", "chosen": long_answer, "rejected": WRONG}
    data = load_pairs(write_jsonl(tmp_path / "p.jsonl", [row]), tok, 40)
    pair = data.samples[0]
    assert len(pair.chosen.input_ids) == 40 and data.stats.truncated == 1
    prompt_ids, _ = tok.encode_chat([{"role": "user", "content": "Who made you?"}],
                                    add_generation_prompt=True)
    assert pair.chosen.input_ids[:len(prompt_ids)] == prompt_ids
    with pytest.raises(DataError, match="leaving no answer token within max_seq_len=8"):
        load_pairs(tmp_path / "p.jsonl", tok, 8)


def test_sft_data_read_as_sft_names_a_pair_file(tok, tmp_path, pairs_file):
    with pytest.raises(DataError, match="a preference pair .* not an SFT record"):
        load_jsonl(pairs_file, tok, 64)


# ---------------------------------------------------------------------------------------------
# Through the loop
# ---------------------------------------------------------------------------------------------


def test_a_dpo_run_raises_the_reward_margin_and_logs_the_rewards(tok, tmp_path, pairs_file):
    cfg = config(tmp_path, pairs_file, max_steps=6, eval_data=str(pairs_file), eval_every=3)
    result = fit(tiny_model(tok.vocab_size), tok, cfg)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(steps) == 6 and len(evals) == 2
    assert all(set(METRICS) <= set(r) for r in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert steps[0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert evals[-1]["eval_rewards/margin"] > evals[0]["eval_rewards/margin"] > 0
    assert evals[-1]["eval_rewards/accuracy"] == 1.0
    assert result.best_eval_loss == evals[-1]["eval_loss"]
    assert run_log.REWARD_METRICS == METRICS


def test_dpo_stop_and_resume_equals_an_uninterrupted_run(tok, tmp_path, pairs_file):
    changes = dict(max_steps=5, save_every=2, lora_dropout=0.1)
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "a", pairs_file, **changes))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "b", pairs_file, stop_after=3,
                                                **changes))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "b", pairs_file, resume=True,
                                                **changes))
    whole, resumed = adapter(tmp_path / "a" / "run"), adapter(tmp_path / "b" / "run")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0)
    metrics = [(tmp_path / d / "run" / "metrics.jsonl").read_text() for d in "ab"]
    rows = [[json.loads(line) for line in m.splitlines()] for m in metrics]
    assert [r["rewards/margin"] for r in rows[1]] == pytest.approx(
        [r["rewards/margin"] for r in rows[0]], abs=1e-6)


@pytest.mark.parametrize("changes", [dict(batch_size=2, accumulation_steps=2),
                                     dict(activation_checkpointing=True)])
def test_accumulation_and_activation_checkpointing_train_what_one_batch_trains(
        tok, tmp_path, pairs_file, changes):
    base = dict(max_steps=2, batch_size=4)
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "one", pairs_file, **base))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "two", pairs_file,
                                                **{**base, **changes}))
    one, two = adapter(tmp_path / "one" / "run"), adapter(tmp_path / "two" / "run")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)


def test_from_adapter_trains_a_copy_against_the_frozen_sft_adapter(tok, tmp_path, pairs_file):
    sft = tiny_model(tok.vocab_size)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", chat_rows(repeat=2))
    fit(sft, tok, TrainConfig(data=str(sft_data), out_dir=str(tmp_path / "sft"), max_steps=3,
                              batch_size=4, lr=5e-3, amp_dtype="float32", lora_r=4))
    model = tiny_model(tok.vocab_size)  # the same base (seed 0)
    cfg = config(tmp_path, pairs_file, from_adapter=str(tmp_path / "sft" / "adapter"),
                 max_steps=3)
    result = fit(model, tok, cfg)
    assert list_adapters(model) == [REFERENCE, "default"]
    steps = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the trained adapter starts as the reference: log 2 and no margin at the first step
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    reference = load_adapter(tiny_model(tok.vocab_size), tmp_path / "sft" / "adapter")
    assert reference.r == 4
    saved_sft = adapter(tmp_path / "sft")
    with torch.no_grad():  # the reference adapter is frozen and unchanged
        for path, m in lora_modules(model):
            a = saved_sft[f"base_model.model.{path}.lora_A.weight"]
            torch.testing.assert_close(m.lora_A[REFERENCE].weight, a)
            assert not m.lora_A[REFERENCE].weight.requires_grad
    trained = adapter(result.output_dir.parent)
    assert any(not torch.equal(trained[k], saved_sft[k]) for k in trained)


def test_from_adapter_of_another_base_is_refused_before_anything_is_written(tok, tmp_path,
                                                                            pairs_file):
    other = tiny_model(tok.vocab_size, seed=1)
    inject_lora(other, LoraConfig(r=2))
    save_adapter(other, tmp_path / "other_adapter")
    cfg = config(tmp_path, pairs_file, from_adapter=str(tmp_path / "other_adapter"))
    model = tiny_model(tok.vocab_size)
    with pytest.raises(AdapterError, match="another base"):
        start_from_adapter(model, cfg)
    assert not lora_modules(model)
    with pytest.raises(AdapterError):
        fit(model, tok, cfg)
    assert not (tmp_path / "run").exists()
    save_model(model, tmp_path / "unused")  # the model is whole again


WORKER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from helpers import fit, tiny_model
from minilora.data.tokenizer import Tokenizer
from minilora.training.config import TrainConfig
tok = Tokenizer.from_file(sys.argv[2])
fit(tiny_model(tok.vocab_size), tok, TrainConfig.from_json(sys.argv[3]))
"""


def test_two_processes_train_and_log_what_one_does_with_the_same_global_batch(
        tok, tmp_path, pairs_file):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    tok_dir = tok.save(tmp_path / "tok")
    ddp = config(tmp_path / "ddp", pairs_file, batch_size=2, max_steps=3,
                 eval_data=str(pairs_file))
    ddp.save_json(tmp_path / "ddp.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tests), str(tok_dir), str(tmp_path / "ddp.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "one", pairs_file, batch_size=4,
                                                max_steps=3, eval_data=str(pairs_file)))
    rows = [[json.loads(line) for line in (tmp_path / d / "run" / "metrics.jsonl").read_text()
             .splitlines()] for d in ("ddp", "one")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for mine, single in zip(*rows, strict=True):
        for key in ("loss", *METRICS, "eval_loss", *(f"eval_{m}" for m in METRICS)):
            if key in single:
                assert mine[key] == pytest.approx(single[key], abs=1e-5), key
    whole, split = adapter(tmp_path / "one" / "run"), adapter(tmp_path / "ddp" / "run")
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=1e-5, rtol=1e-4)


def test_dpo_over_a_quantized_base_trains_against_the_quantized_base(tok, tmp_path, pairs_file):
    pytest.importorskip("bitsandbytes")
    result = fit(tiny_model(tok.vocab_size, hidden=64), tok,
                 config(tmp_path, pairs_file, quantize="nf4", max_steps=3))
    losses = [loss for _, loss in result.losses]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the reference: the same NF4 base
    assert losses[-1] < losses[0]


def test_a_run_from_an_sft_adapter_resumes_exactly(tok, tmp_path, pairs_file):
    sft = tiny_model(tok.vocab_size)
    inject_lora(sft, LoraConfig(r=2))
    with torch.no_grad():
        for _, m in lora_modules(sft):
            m.lora_B["default"].weight.normal_(0, 0.1)
    save_adapter(sft, tmp_path / "sft")
    changes = dict(max_steps=4, save_every=1, from_adapter=str(tmp_path / "sft"))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "a", pairs_file, **changes))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "b", pairs_file, stop_after=2,
                                                **changes))
    fit(tiny_model(tok.vocab_size), tok, config(tmp_path / "b", pairs_file, resume=True,
                                                **changes))
    whole, resumed = adapter(tmp_path / "a" / "run"), adapter(tmp_path / "b" / "run")
    assert set(whole) == set(resumed) == set(load_file_keys(tmp_path / "sft"))
    assert not any(REFERENCE in key for key in whole)  # the trained adapter alone is saved
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0)
