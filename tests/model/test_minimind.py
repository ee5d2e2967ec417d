"""MiniMind fidelity: both generations of its model file against a reference written out here.

The reference below is MiniMind's computation restated from its model/model_minimind.py (the
current "minimind-3" file and the older MiniMind2 one), in its own terms and without minilora's
code: RMSNorm, RoPE with its YaRN blend, attention, the router with each generation's
renormalisation rule, shared experts, and both generations' load-balancing losses. The configs
are MiniMind's own config.json / MiniMindConfig.to_dict() outputs (sizes shrunk).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minilora.core.errors import ConfigError, WeightsError
from minilora.model.decoder import CausalLM, ModelConfig
from minilora.model.io import load_model

H, HEADS, KV, HD, VOCAB, LAYERS, E = 32, 4, 2, 8, 64, 2, 4
YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
        "attention_factor": 1.0, "type": "yarn"}

# MiniMindConfig(hidden_size=32, ...).save_pretrained() of the current file (transformers 5).
CURRENT = {
    "bos_token_id": 1, "dropout": 0.0, "eos_token_id": 2, "flash_attn": True, "head_dim": HD,
    "hidden_act": "silu", "hidden_size": H, "inference_rope_scaling": False,
    "intermediate_size": 128, "max_position_embeddings": 32768, "model_type": "minimind",
    "moe_intermediate_size": 128, "norm_topk_prob": True, "num_attention_heads": HEADS,
    "num_experts": E, "num_experts_per_tok": 1, "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV, "rms_norm_eps": 1e-06, "rope_parameters": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.0005, "tie_word_embeddings": True,
    "transformers_version": "5.24.0", "use_moe": True, "vocab_size": VOCAB,
}
# a hand-edited current config: rope_parameters decide, no inference_rope_scaling flag
NO_FLAG = {k: v for k, v in CURRENT.items() if k != "inference_rope_scaling"}
# MiniMindConfig(...).to_dict() of the MiniMind2 file (PretrainedConfig's own keys included).
MINIMIND2 = {
    "transformers_version": "5.24.0", "architectures": None, "output_hidden_states": False,
    "return_dict": True, "dtype": None, "chunk_size_feed_forward": 0, "is_encoder_decoder": False,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "problem_type": None, "_name_or_path": "", "dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": H, "intermediate_size": None,
    "max_position_embeddings": 32768, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "inference_rope_scaling": False, "rope_parameters": None,
    "flash_attn": True, "use_moe": True, "num_experts_per_tok": 2, "n_routed_experts": E,
    "n_shared_experts": 1, "scoring_func": "softmax", "aux_loss_alpha": 0.01, "seq_aux": True,
    "norm_topk_prob": True, "model_type": "minimind", "output_attentions": False,
}


# ------------------------------------------------------------------------------------------------
# The reference: MiniMind's forward, restated
# ------------------------------------------------------------------------------------------------


def is_current(cfg: dict) -> bool:
    return "num_experts" in cfg


def ref_yarn(cfg: dict) -> dict | None:
    """MiniMindConfig: rope_scaling exists iff inference_rope_scaling (4.x writes rope_scaling,
    5.x rope_parameters, same values). A file without the flag: its own YaRN values."""
    if "inference_rope_scaling" in cfg and not cfg["inference_rope_scaling"]:
        return None
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {**YARN}


def ref_cos_sin(cfg: dict, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """precompute_freqs_cis: f_i = theta^(-2i/d); YaRN when the table outgrows the original
    context: f_i * (1 - g_i + g_i / factor), g a ramp over the dimension indices between
    floor(D(beta_fast)) and ceil(D(beta_slow)), D(b) = d ln(orig / (2 pi b)) / (2 ln theta);
    cos and sin times attention_factor."""
    d, theta = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"], \
        cfg["rope_theta"]
    freq = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    gain = 1.0
    yarn = ref_yarn(cfg)
    orig = yarn and yarn["original_max_position_embeddings"]
    if yarn is not None and cfg["max_position_embeddings"] > orig:

        def dim(b):
            return d * math.log(orig / (2 * math.pi * b)) / (2 * math.log(theta))

        lo = max(math.floor(dim(yarn["beta_fast"])), 0)
        hi = min(math.ceil(dim(yarn["beta_slow"])), d // 2 - 1)
        g = [min(max((i - lo) / max(hi - lo, 0.001), 0.0), 1.0) for i in range(d // 2)]
        freq = freq * torch.tensor([1 - gi + gi / yarn["factor"] for gi in g], dtype=torch.float64)
    if yarn is not None:  # read with the other values, applied even without the blend
        gain = yarn["attention_factor"]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, d/2)
    angle = torch.cat([angle, angle], dim=-1)
    return (angle.cos() * gain).float(), (angle.sin() * gain).float()


def ref_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_rotate(x, cos, sin):  # x (B, T, heads, d)
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None] + turned * sin[None, :, None]


def ref_ffn(sd, p, x):
    return F.linear(F.silu(F.linear(x, sd[p + "gate_proj.weight"]))
                    * F.linear(x, sd[p + "up_proj.weight"]), sd[p + "down_proj.weight"])


def ref_moe(cfg, sd, p, x, training):
    """Router, each generation's renormalisation, routed + shared experts, aux loss."""
    B, T, C = x.shape
    flat = x.reshape(B * T, C)
    probs = torch.softmax(flat @ sd[p + "gate.weight"].T, dim=-1)  # (N, E)
    k = cfg["num_experts_per_tok"]
    w, idx = torch.topk(probs, k, dim=-1)
    current = is_current(cfg)
    # current: renormalise whenever norm_topk_prob; MiniMind2: only when k > 1
    if cfg["norm_topk_prob"] and (current or k > 1):
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    n_exp = cfg["num_experts"] if current else cfg["n_routed_experts"]
    out = torch.zeros_like(flat)
    for t in range(B * T):
        for j in range(k):
            out[t] += w[t, j] * ref_ffn(sd, f"{p}experts.{int(idx[t, j])}.", flat[t])
    for s in range(0 if current else cfg["n_shared_experts"]):
        out = out + ref_ffn(sd, f"{p}shared_experts.{s}.", flat)
    aux = torch.zeros(())
    coef = cfg["router_aux_loss_coef"] if current else cfg["aux_loss_alpha"]
    if training and coef > 0:
        if current:  # load[j, e] = share of tokens whose j-th pick is e; pbar = mean prob
            load = torch.stack([(idx[:, j:j + 1] == torch.arange(n_exp)).float().mean(0)
                                for j in range(k)])  # (k, E)
            aux = coef * n_exp * (load * probs.mean(0)).sum()
        elif cfg["seq_aux"]:  # per sequence: picks per expert / (T k / E) times mean prob
            per_seq = []
            for b in range(B):
                picks = idx.view(B, T * k)[b]
                counts = torch.stack([(picks == e).sum() for e in range(n_exp)]).float()
                per_seq.append((counts / (T * k / n_exp) * probs.view(B, T, -1)[b].mean(0)).sum())
            aux = coef * torch.stack(per_seq).mean()
        else:  # over the batch: E * sum(share of all picks * mean prob)
            share = torch.stack([(idx.reshape(-1) == e).float().mean() for e in range(n_exp)])
            aux = coef * (probs.mean(0) * share * n_exp).sum()
    return out.view(B, T, C), aux


def ref_forward(cfg, sd, ids, training=False):
    """MiniMindForCausalLM.forward: (logits, aux_loss summed over the layers)."""
    B, T = ids.shape
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eps = cfg["rms_norm_eps"]
    cos, sin = ref_cos_sin(cfg, T)
    x = sd["model.embed_tokens.weight"][ids]
    aux_total = torch.zeros(())
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = F.linear(h, sd[p + "self_attn.q_proj.weight"]).view(B, T, heads, d)
        k = F.linear(h, sd[p + "self_attn.k_proj.weight"]).view(B, T, kv, d)
        v = F.linear(h, sd[p + "self_attn.v_proj.weight"]).view(B, T, kv, d)
        if is_current(cfg):  # the current file normalises every head of q and k
            q = ref_norm(q, sd[p + "self_attn.q_norm.weight"], eps)
            k = ref_norm(k, sd[p + "self_attn.k_norm.weight"], eps)
        q, k = ref_rotate(q, cos, sin), ref_rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv, dim=2)
        v = v.repeat_interleave(heads // kv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d) + causal
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, heads * d)
        x = x + F.linear(y, sd[p + "self_attn.o_proj.weight"])
        h = ref_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg["use_moe"]:
            out, aux = ref_moe(cfg, sd, p + "mlp.", h, training)
            aux_total = aux_total + aux
        else:
            out = ref_ffn(sd, p + "mlp.", h)
        x = x + out
    x = ref_norm(x, sd["model.norm.weight"], eps)
    return x @ sd["model.embed_tokens.weight"].T, aux_total  # tied head


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """MiniMindForCausalLM's keys for cfg, random values (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    current = is_current(cfg)
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inter = cfg["intermediate_size"] or 64 * ((int(H * 8 / 3) + 63) // 64)
    moe_inter = cfg.get("moe_intermediate_size", inter)

    def w(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def ffn(p, width):
        return {p + "gate_proj.weight": w(width, H), p + "up_proj.weight": w(width, H),
                p + "down_proj.weight": w(H, width)}

    sd = {"model.embed_tokens.weight": w(VOCAB, H, scale=1.0), "model.norm.weight": 1 + w(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(HEADS * d, H),
               p + "self_attn.k_proj.weight": w(KV * d, H),
               p + "self_attn.v_proj.weight": w(KV * d, H),
               p + "self_attn.o_proj.weight": w(H, HEADS * d),
               p + "input_layernorm.weight": 1 + w(H),
               p + "post_attention_layernorm.weight": 1 + w(H)}
        if current:
            sd |= {p + "self_attn.q_norm.weight": 1 + w(d),
                   p + "self_attn.k_norm.weight": 1 + w(d)}
        if not cfg["use_moe"]:
            sd |= ffn(p + "mlp.", inter)
            continue
        sd[p + "mlp.gate.weight"] = w(E, H, scale=1.0)
        for e in range(E):
            sd |= ffn(f"{p}mlp.experts.{e}.", moe_inter)
        for s in range(0 if current else cfg["n_shared_experts"]):
            sd |= ffn(f"{p}mlp.shared_experts.{s}.", inter)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    return sd


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------

CASES = {  # name: config.json as MiniMind writes it
    "current-moe-top1": CURRENT,
    "current-moe-top2": {**CURRENT, "num_experts_per_tok": 2},
    "current-moe-top1-no-norm": {**CURRENT, "norm_topk_prob": False},
    "current-moe-narrow-experts": {**CURRENT, "moe_intermediate_size": 64},
    "current-dense-yarn-5.x": {**CURRENT, "use_moe": False, "inference_rope_scaling": True,
                               "rope_parameters": {**YARN, "rope_type": "yarn",
                                                   "rope_theta": 1e6}},
    "current-dense-yarn-4.x": {**CURRENT, "use_moe": False, "inference_rope_scaling": True,
                               "rope_scaling": YARN},
    "minimind2-moe-top2-shared-seq-aux": MINIMIND2,
    "minimind2-moe-top1-shared": {**MINIMIND2, "num_experts_per_tok": 1},
    "minimind2-moe-batch-aux": {**MINIMIND2, "seq_aux": False, "aux_loss_alpha": 0.1},
    "minimind2-moe-no-shared": {**MINIMIND2, "n_shared_experts": 0},
    "minimind2-dense-yarn": {**MINIMIND2, "use_moe": False, "inference_rope_scaling": True,
                             "rope_parameters": {**YARN, "rope_type": "yarn", "rope_theta": 1e6}},
}


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_logits_and_aux_loss_match_minimind(tmp_path, cfg):
    sd = random_state_dict(cfg)
    torch.save({f"module.{k}": v.clone() for k, v in sd.items()}, tmp_path / "full_sft.pth")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path / "full_sft.pth")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = ref_forward(cfg, sd, ids)
        got = model(ids).logits
        want_aux = ref_forward(cfg, sd, ids, training=True)[1]
        got_aux = model.train()(ids).aux_loss
    assert (got - want).abs().max().item() <= 1e-4
    if cfg["use_moe"]:
        assert got_aux.item() > 0
    assert abs(got_aux.item() - want_aux.item()) <= 1e-6 * max(1.0, want_aux.item())


def test_top1_renormalisation_changes_the_logits():
    # the reference itself tells the two rules apart on these weights: a rule swap shows
    cfg = CURRENT
    sd = random_state_dict(cfg)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        renormalised, _ = ref_forward(cfg, sd, ids)
        as_minimind2, _ = ref_forward({**cfg, "norm_topk_prob": False}, sd, ids)
    assert (renormalised - as_minimind2).abs().max().item() > 0.1


def test_yarn_tables_match_the_formula():
    for cfg in (CASES["current-dense-yarn-5.x"],
                {**NO_FLAG, "use_moe": False, "rope_parameters": {
                    **YARN, "rope_type": "yarn", "rope_theta": 1e6, "factor": 4,
                    "attention_factor": 0.8, "beta_fast": 16}},
                {**CURRENT, "use_moe": False, "max_position_embeddings": 1024,
                 "inference_rope_scaling": True}):
        model = CausalLM(ModelConfig.from_hf_dict(cfg))
        assert model.config.rope_scaling is not None
        cos, sin = model.model.rotary(0, 300, torch.device("cpu"), torch.float32)
        want_cos, want_sin = ref_cos_sin(cfg, 300)
        assert (cos - want_cos).abs().max().item() <= 1e-4  # float32 angles up to 300
        assert (sin - want_sin).abs().max().item() <= 1e-4
    plain, _ = ref_cos_sin({**CURRENT, "inference_rope_scaling": False}, 300)
    assert (ref_cos_sin(CASES["current-dense-yarn-5.x"], 300)[0] - plain).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------
# Configs and bare .pth files
# ------------------------------------------------------------------------------------------------


def test_minimind_configs_load_with_their_generation():
    c = ModelConfig.from_hf_dict(CURRENT)
    assert (c.minimind_generation, c.num_experts_per_tok, c.n_shared_experts, c.rms_norm_eps,
            c.router_aux_loss_coef, c.qk_norm, c.moe_intermediate_size) == (
        "minimind3", 1, 0, 1e-6, 5e-4, True, 128)
    # MiniMindConfig.to_dict() adds PretrainedConfig's own keys, which change nothing
    own = {k: v for k, v in MINIMIND2.items() if k in (
        "architectures", "output_hidden_states", "return_dict", "dtype", "id2label", "label2id",
        "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_name_or_path",
        "output_attentions")}
    assert ModelConfig.from_hf_dict({**own, **CURRENT}) == c
    c = ModelConfig.from_hf_dict(MINIMIND2)
    assert (c.minimind_generation, c.num_experts_per_tok, c.n_shared_experts, c.rms_norm_eps,
            c.router_aux_loss_coef, c.seq_aux, c.qk_norm, c.intermediate_size) == (
        "minimind2", 2, 1, 1e-5, 0.01, True, False, 128)
    # keys a file leaves out take its generation's MiniMindConfig defaults
    sparse = ModelConfig.from_hf_dict({"model_type": "minimind", "hidden_size": 64,
                                       "use_moe": True, "num_experts": 4})
    assert (sparse.num_key_value_heads, sparse.rms_norm_eps, sparse.num_experts_per_tok,
            sparse.intermediate_size) == (4, 1e-6, 1, 256)


@pytest.mark.parametrize("cfg", [CURRENT, MINIMIND2, CASES["current-dense-yarn-5.x"],
                                 CASES["minimind2-moe-batch-aux"]],
                         ids=["current", "minimind2", "yarn", "batch-aux"])
def test_config_json_round_trip_keeps_the_generation(tmp_path, cfg):
    config = ModelConfig.from_hf_dict(cfg)
    config.save_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("cfg, message", [
    ({**CURRENT, "seq_aux": True}, "both MiniMind generations"),
    ({"model_type": "minimind", "hidden_size": 32, "use_moe": True, "num_experts_per_tok": 2},
     "does not tell num_key_value_heads, intermediate_size, rms_norm_eps, the MoE generation"),
    ({**CURRENT, "inference_rope_scaling": True,
      "rope_parameters": {**YARN, "factor": 4, "rope_type": "yarn"}}, "factor 4 .MiniMind uses 16"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
    ({**NO_FLAG, "rope_parameters": {"rope_type": "yarn", "factor": -1}},
     "factor must be positive"),
], ids=["both-generations", "unknown-generation", "yarn-edited", "llama-yarn", "bad-factor"])
def test_configs_minilora_cannot_honour_are_refused(cfg, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(cfg)


def test_bare_pth_needs_a_config_and_says_what_it_lacks(tmp_path):
    sd = random_state_dict(CURRENT)
    torch.save(sd, tmp_path / "moe.pth")
    with pytest.raises(WeightsError) as err:
        load_model(tmp_path / "moe.pth")
    msg = str(err.value)
    assert "\n" not in msg
    for what in ("rms_norm_eps", "rope_theta", "num_experts_per_tok", "norm_topk_prob",
                 "config=FILE", "config='minimind3'"):
        assert what in msg
    # naming the generation takes its defaults, the sizes from the shapes: the reference's logits
    model = load_model(tmp_path / "moe.pth", config="minimind3")
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_experts,
            c.num_experts_per_tok, c.n_shared_experts, c.rms_norm_eps) == (HEADS, KV, HD, E, 1, 0,
                                                                            1e-6)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (model(ids).logits - ref_forward(CURRENT, sd, ids)[0]).abs().max() <= 1e-4
    with pytest.raises(WeightsError, match="config 'minimind2', but the tensors are minimind3"):
        load_model(tmp_path / "moe.pth", config="minimind2")


def test_a_bare_safetensors_file_loads_with_its_generation_named(tmp_path):
    # the safetensors loader reads shapes first (meta tensors): naming the generation must not
    # need the values, and the model must be the same as from the .pth
    from safetensors.torch import save_file
    sd = random_state_dict(CURRENT)
    save_file({k: v.clone() for k, v in sd.items()}, tmp_path / "moe.safetensors")
    model = load_model(tmp_path / "moe.safetensors", config="minimind3")
    assert model.config.num_experts == E
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (model(ids).logits - ref_forward(CURRENT, sd, ids)[0]).abs().max() <= 1e-4
