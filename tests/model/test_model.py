"""model/decoder.py against transformers on the same weights, plus loss, cache, MoE and generation
(minilora.decoding.generation)."""

import math

import pytest
import torch
import torch.nn.functional as F

from minilora.model.decoder import CausalLM, KVCache, ModelConfig

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 max abs difference on logits

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# (name, transformers config class, extra kwargs)
HF_CASES = [
    ("llama", "LlamaConfig", {}),
    ("llama-tied-mha", "LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("llama-bias", "LlamaConfig", {"attention_bias": True, "rope_theta": 500000.0}),
    ("qwen2", "Qwen2Config", {}),
    ("qwen2-tied", "Qwen2Config", {"tie_word_embeddings": True}),
    ("qwen3", "Qwen3Config", {"head_dim": 16}),
    ("qwen3-bias", "Qwen3Config", {"head_dim": 8, "attention_bias": True}),
]


def hf_pair(cls_name: str, extra: dict, seed: int = 0):
    """A random transformers model and a minilora model holding the same weights."""
    torch.manual_seed(seed)
    hf_config = getattr(transformers, cls_name)(**{**SMALL, **extra})
    hf = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(hf_config).eval()
    # randomise norms and biases too, so a swapped or missing one shows in the logits
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    ours = CausalLM(config).eval()
    sd = hf.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    return hf, ours


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_logits_match_transformers(name, cls_name, extra):
    hf, ours = hf_pair(cls_name, extra)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES[::3], ids=[c[0] for c in HF_CASES[::3]])
def test_right_padded_batch_matches_transformers(name, cls_name, extra):
    hf, ours = hf_pair(cls_name, extra)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL
    # padding must not leak into real positions: the short row alone gives the same logits
    with torch.no_grad():
        alone = ours(ids[2:3, :2]).logits
    assert (alone[0] - got[2, :2]).abs().max().item() <= 1e-5


def test_masked_loss_equals_hand_computation():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 4))
    labels = torch.tensor([[7, 1, -100, 3], [7, -100, 4, -100]])  # first column is never a target
    counted = [(0, 0, 1), (0, 2, 3), (1, 1, 4)]  # (row, predicting position, target)
    with torch.no_grad():
        logits = model(ids).logits
        loss = model(ids, labels=labels).loss
    want = sum(-F.log_softmax(logits[b, t], -1)[y] for b, t, y in counted) / len(counted)
    assert torch.allclose(loss, want, atol=1e-6)


def test_model_loss_is_shifted_and_all_masked_gives_zero():
    model = CausalLM(ModelConfig(**SMALL))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 6))
    out = model(ids, labels=ids)
    V = SMALL["vocab_size"]
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0

    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and not math.isnan(out.loss.item())
    out.loss.backward()  # a zero loss still backpropagates without NaN
    assert all(not p.grad.isnan().any() for p in model.parameters() if p.grad is not None)


def test_loss_over_counted_positions_only_equals_the_full_computation():
    # The model computes the head only where a label counts; the loss and the gradients must be
    # those of the full logits with the masked cross-entropy (torch's, ignore_index=-100).
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL))
    ids = torch.randint(0, SMALL["vocab_size"], (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 2:7] = -100
    labels[2, :] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    V = SMALL["vocab_size"]
    want = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    want.backward()
    assert torch.allclose(out.loss, want, atol=1e-6)
    for g, p in zip(got, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert out.logits.shape == (3, 9, SMALL["vocab_size"])  # still there when asked for


def test_tied_head_is_the_embedding():
    tied = CausalLM(ModelConfig(**SMALL, tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = CausalLM(ModelConfig(**SMALL, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_logits_with_cache_equal_logits_without():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL, qk_norm=True)).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 4)  # too small on purpose: it must grow
        pieces = [model(ids[:, :5], past_key_values=cache).logits]  # prefill
        pieces.append(model(ids[:, 5:8], past_key_values=cache).logits)  # a chunk after a prefix
        pieces += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(8, 12)]
    assert cache.length == 12
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5
    with torch.no_grad():  # use_cache starts a cache of its own and returns it
        out = model(ids[:, :11], use_cache=True)
        last = model(ids[:, 11:], past_key_values=out.past_key_values, logits_to_keep=1).logits
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5


def test_config_validation_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(**{**SMALL, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unknown ModelConfig key.*'n_embd'"):
        ModelConfig.from_dict({"n_embd": 8})
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_dict({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
    for config in [ModelConfig(**SMALL, model_type="qwen3", qk_norm=True, head_dim=16),
                   ModelConfig(**SMALL, model_type="qwen2", attention_bias=True),
                   ModelConfig(**SMALL, model_type="llama", qk_norm=True, use_moe=True),
                   ModelConfig(**SMALL, use_moe=True, num_experts=3, seq_aux=False)]:
        assert ModelConfig.from_dict(config.to_dict()) == config
        config.save_json(tmp_path / "config.json")
        assert ModelConfig.from_json(tmp_path / "config.json") == config
    # rope_theta where transformers 4 (top level) and 5 (rope_parameters) put it
    for d in ({"rope_theta": 5e5}, {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
              {"rope_theta": 5e5, "rope_scaling": {"type": "default"}}):
        assert ModelConfig.from_hf_dict({"model_type": "llama", **d}).rope_theta == 5e5
    assert ModelConfig.from_hf_dict({"model_type": "qwen2"}).rope_theta == 10000.0
    # MiniMind's default width rule
    assert ModelConfig(hidden_size=512).intermediate_size == 1408


def test_config_with_several_bad_fields_names_all_of_them():
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**SMALL, "num_key_value_heads": 3, "rms_norm_eps": -1.0, "rope_theta": 0.0,
                       "use_moe": True, "num_experts_per_tok": 9})
    message = str(info.value)
    for field_name in ("num_key_value_heads", "rms_norm_eps", "rope_theta", "num_experts_per_tok"):
        assert f"{field_name}" in message, (field_name, message)
    with pytest.raises(ValueError, match="vocab_size.*hidden_size"):  # the sizes, together
        ModelConfig(**{**SMALL, "vocab_size": 0, "hidden_size": -4})


def minimind_moe_reference(moe, x):
    """MiniMind's MOEFeedForward.forward in training mode, transcribed (repeat_interleave path)."""
    gate = moe.gate
    B, T, C = x.shape
    scores = F.linear(x.view(-1, C), gate.weight).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
    if gate.top_k > 1 and gate.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    idx = topk_idx.view(B, -1)
    if gate.seq_aux:
        ce = torch.zeros(B, gate.n_experts)
        ce.scatter_add_(1, idx, torch.ones(B, T * gate.top_k)).div_(T * gate.top_k / gate.n_experts)
        aux = (ce * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * gate.alpha
    else:
        ce = F.one_hot(idx.view(-1), num_classes=gate.n_experts).float().mean(0)
        aux = (scores.mean(0) * ce * gate.n_experts).sum() * gate.alpha
    flat = x.view(-1, C).repeat_interleave(gate.top_k, dim=0)
    flat_idx = topk_idx.view(-1)
    y = torch.empty_like(flat)
    for i, expert in enumerate(moe.experts):
        y[flat_idx == i] = expert(flat[flat_idx == i])
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).view(B, T, C)
    for expert in moe.shared_experts:
        y = y + expert(x)
    return y, aux


MOE_CASES = [  # (num_experts, top_k, n_shared, seq_aux, norm_topk_prob)
    (4, 2, 1, True, True),
    (4, 2, 0, False, False),
    (3, 1, 1, True, True),
    (4, 1, 0, False, True),
]


@pytest.mark.parametrize("n_exp,top_k,n_shared,seq_aux,norm", MOE_CASES)
def test_moe_matches_minimind_and_trains(n_exp, top_k, n_shared, seq_aux, norm):
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, use_moe=True, num_experts=n_exp, num_experts_per_tok=top_k,
                         n_shared_experts=n_shared, seq_aux=seq_aux, norm_topk_prob=norm)
    model = CausalLM(config).train()
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 7, SMALL["hidden_size"])
    y, aux = moe(x)
    want_y, want_aux = minimind_moe_reference(moe, x)
    assert (y - want_y).abs().max().item() <= 1e-6
    assert torch.allclose(aux, want_aux, atol=1e-7)

    ids = torch.randint(0, SMALL["vocab_size"], (2, 10))
    out = model(ids, labels=ids)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    out.aux_loss.backward(retain_graph=True)
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum().item() > 0  # the router learns balance
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = out.loss.item()
    (out.loss + out.aux_loss).backward()
    opt.step()
    after = model(ids, labels=ids).loss.item()
    assert math.isfinite(after) and after < before
    model.eval()  # MiniMind computes the balancing loss while training only
    assert model(ids).aux_loss.item() == 0.0


def hf_greedy(hf, prompt, n, **kwargs):
    # no eos anywhere: a model-level eos would also be suppressed by min_new_tokens, changing argmax
    hf.generation_config.eos_token_id = None
    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0, **kwargs)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=gen_config,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_greedy_generation_matches_transformers(name, cls_name, extra):
    from minilora.decoding.generation import generate

    hf, ours = hf_pair(cls_name, extra)
    prompt = torch.randint(0, SMALL["vocab_size"], (7,)).tolist()
    want = hf_greedy(hf, prompt, 32)
    assert len(want) == 32
    assert generate(ours, prompt, max_new_tokens=32) == want
    # repetition penalty: same processor as transformers
    assert (generate(ours, prompt, max_new_tokens=32, repetition_penalty=1.5)
            == hf_greedy(hf, prompt, 32, repetition_penalty=1.5))


def test_sampling_controls():
    from minilora.decoding.generation import generate

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL)).eval()
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, prompt, max_new_tokens=12)
    assert len(greedy) == 12
    # top_k=1 and a tiny top_p leave only the most likely token
    assert generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompt, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=1) == greedy
    a = generate(model, prompt, max_new_tokens=12, temperature=5.0, seed=7)
    assert a == generate(model, prompt, max_new_tokens=12, temperature=5.0, seed=7)
    assert a != generate(model, prompt, max_new_tokens=12, temperature=5.0, seed=8)
    # top_k keeps every sampled token among the k most likely at its step
    toks = generate(model, prompt, max_new_tokens=6, temperature=5.0, top_k=3, seed=3)
    ctx = list(prompt)
    for t in toks:
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1]
        assert t in torch.topk(logits, 3).indices.tolist()
        ctx.append(t)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, top_p=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, [])


def test_eos_and_stop_sequences():
    from minilora.decoding.generation import generate, stream_generate

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL)).eval()
    prompt = [3, 1, 4]
    full = generate(model, prompt, max_new_tokens=20)
    # eos: generation ends before the first eos, which is not returned
    eos = full[5]
    first = full.index(eos)
    assert generate(model, prompt, max_new_tokens=20, eos_token_id=[99, eos]) == full[:first]
    # a stop sequence: everything before its first occurrence, nothing of it
    seq = full[6:9]
    at = next(i for i in range(len(full)) if full[i:i + 3] == seq)
    assert generate(model, prompt, max_new_tokens=20, stop=[seq]) == full[:at]
    # a stop sequence that only starts to match is released once it cannot match any more
    near = [full[6], full[7], -1]
    assert generate(model, prompt, max_new_tokens=20, stop=[near]) == full
    assert list(stream_generate(model, prompt, max_new_tokens=20, stop=[near])) == full
    # streaming yields the tokens one by one, lazily
    stream = stream_generate(model, prompt, max_new_tokens=20)
    assert next(stream) == full[0] and next(stream) == full[1]


def test_training_after_generation():
    # tables built under inference_mode while generating must not break autograd afterwards
    from minilora.decoding.generation import generate

    model = CausalLM(ModelConfig(**SMALL))
    generate(model, [1, 2, 3], max_new_tokens=300)  # long enough to grow the rotary table
    ids = torch.randint(0, SMALL["vocab_size"], (1, 290))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("extra", [{}, {"model_type": "qwen3", "qk_norm": True}],
                         ids=["llama", "qwen3"])
def test_packed_row_computes_each_sample_as_if_alone(extra, amp):
    # The reference is each sample run alone at positions 0.. with no other sample in view; a
    # packed row that leaked attention or positions across samples changes every later sample.
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**{**SMALL, **extra})).eval()
    lengths = [5, 9, 3, 7]
    samples = [torch.randint(0, 96, (n,)) for n in lengths]
    row = torch.cat(samples)[None]  # (1, 24)
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    labels = row.clone()
    labels[0, segments[0].diff(prepend=torch.tensor([0])) != 0] = -100  # each sample's first token
    tol = 1e-5 if amp is None else 3e-2
    autocast = torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None)
    with torch.no_grad(), autocast:
        packed = model(row, segment_ids=segments).logits[0].float()  # (24, V)
        packed_loss = model(row, labels=labels, segment_ids=segments).loss.float()
        at, alone_sum, count = 0, 0.0, 0
        for s in samples:
            alone = model(s[None]).logits[0].float()  # (n, V)
            torch.testing.assert_close(packed[at:at + len(s)], alone, rtol=tol, atol=tol)
            alone_sum += F.cross_entropy(alone[:-1], s[1:], reduction="sum")
            count += len(s) - 1
            at += len(s)
    # The packed loss is the token mean of the samples' own losses (boundaries not counted).
    torch.testing.assert_close(packed_loss, alone_sum / count, rtol=tol, atol=tol)
    # And it differs from what plain causal packing (attention across samples) computes.
    with torch.no_grad():
        leaky = model(row).logits[0]
    assert (leaky[lengths[0]:] - model(row, segment_ids=segments).logits[0][lengths[0]:]
            ).abs().max() > 1e-3


def test_a_huge_max_new_tokens_does_not_allocate_its_cache_up_front():
    # A stop token ends the reply after a few tokens: the KV cache must not have been sized for
    # the 10^12 tokens it was allowed (that allocation fails, or takes the machine's memory).
    from minilora.decoding import generation
    from minilora.decoding.generation import generate, generate_batch

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL)).eval()
    prompt = [3, 1, 4, 1, 5]
    sampled = generate(model, prompt, max_new_tokens=16, temperature=2.0, seed=0)
    cut = next(i for i in range(1, 16) if sampled[i] not in sampled[:i])
    stop, want = sampled[cut], sampled[:cut]  # the stop token ends the reply (not included)
    assert generate(model, prompt, max_new_tokens=10**12, eos_token_id=stop, temperature=2.0,
                    seed=0) == want
    greedy = generate_batch(model, [prompt], max_new_tokens=3)[0]
    assert generate_batch(model, [prompt], max_new_tokens=10**12,
                          eos_token_id=greedy[-1]) == [greedy[:greedy.index(greedy[-1])]]
    # Past the first room the cache grows: more new tokens than it starts with, same tokens.
    short = generation.FIRST_CAPACITY
    try:
        generation.FIRST_CAPACITY = 2
        assert generate(model, prompt, max_new_tokens=12) == generate_batch(
            model, [prompt], max_new_tokens=12)[0]
    finally:
        generation.FIRST_CAPACITY = short
