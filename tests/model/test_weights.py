"""minilora.model.io: HF folders from transformers' save_pretrained, MiniMind .pth, save_model."""

import json

import pytest
import torch

from minilora.model.decoder import CausalLM, ModelConfig
from minilora.model.io import WeightsError, load_model, save_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 max abs difference on logits

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

HF_CASES = [  # (name, transformers config class, extra kwargs)
    ("llama", "LlamaConfig", {}),
    ("llama-tied", "LlamaConfig", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    ("qwen2", "Qwen2Config", {}),
    ("qwen2-tied", "Qwen2Config", {"tie_word_embeddings": True}),
    ("qwen3", "Qwen3Config", {"head_dim": 16}),
    ("qwen3-tied", "Qwen3Config", {"head_dim": 8, "tie_word_embeddings": True}),
]
IDS = [c[0] for c in HF_CASES]


def hf_model(cls_name, extra, seed=0):
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**{**SMALL, **extra})
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    return model


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES, ids=IDS)
def test_hf_folder_logits_match_transformers(tmp_path, name, cls_name, extra):
    hf = hf_model(cls_name, extra)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.model_type == name.split("-")[0]
    assert ours.config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL
        got = ours(ids, attention_mask=mask).logits
        want = hf(ids, attention_mask=mask).logits
    assert max_diff(got[mask.bool()], want[mask.bool()]) <= TOL


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES[::2], ids=IDS[::2])
def test_sharded_folder_loads(tmp_path, name, cls_name, extra):
    hf = hf_model(cls_name, extra)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_model(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL


@pytest.mark.parametrize("name,cls_name,extra", HF_CASES, ids=IDS)
def test_save_model_is_read_by_transformers(tmp_path, name, cls_name, extra):
    ours = load_model(_saved(hf_model(cls_name, extra, seed=1), tmp_path / "src"))
    save_model(ours, tmp_path / "out")
    if ours.config.tie_word_embeddings:  # as save_pretrained: the tied head is not stored
        from safetensors import safe_open
        with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == cls_name.replace("Config", "ForCausalLM")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids).logits) <= TOL


def _saved(hf, folder):
    hf.save_pretrained(folder)
    return folder


def test_save_model_shards_and_dtype_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SMALL, use_moe=True, qk_norm=True))
    save_model(model, tmp_path, max_shard_size=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)

    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    half = load_model(tmp_path / "bf16", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8))
    with torch.no_grad():
        assert max_diff(half(ids).logits, model.eval()(ids).logits) <= 0.05
    assert half.lm_head.weight is half.model.embed_tokens.weight


@pytest.mark.parametrize("first,second", [(30_000, None), (None, 30_000), (20_000, 60_000)],
                         ids=["sharded-then-single", "single-then-sharded", "more-then-fewer"])
def test_a_save_replaces_an_earlier_save_in_the_same_folder(tmp_path, first, second):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(CausalLM(ModelConfig(**SMALL)))
    save_model(models[0], tmp_path, max_shard_size=first)
    save_model(models[1], tmp_path, max_shard_size=second)
    again = load_model(tmp_path)
    for (k, a), (k2, b) in zip(models[1].state_dict().items(), again.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    names = sorted(p.name for p in tmp_path.iterdir())
    if second is None:
        assert names == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert names == sorted(["config.json", "model.safetensors.index.json", *shards])


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, where):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_model(CausalLM(ModelConfig(**SMALL)), folder, max_shard_size=30_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = index["weight_map"]["model.norm.weight"]
    (tmp_path / "sub").mkdir()
    target = tmp_path / ("sub" if where == "subfolder" else "") / moved
    (folder / moved).rename(target)
    name = {"parent": f"../{moved}", "absolute": str(target), "subfolder": f"../sub/{moved}"}
    index["weight_map"] = {k: name[where] if v == moved else v
                           for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"weight_map names shards .*; expected file names "
                                           r"inside"):
        load_model(folder)


# ------------------------------------------------------------------------------------------------
# MiniMind .pth
# ------------------------------------------------------------------------------------------------

MINIMIND_CONFIG = {  # MiniMindConfig's fields, as its config.json writes them
    "model_type": "minimind", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 96, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
    "max_position_embeddings": 32768, "intermediate_size": None, "hidden_act": "silu",
    "dropout": 0.0, "flash_attn": True, "bos_token_id": 1, "eos_token_id": 2,
    "use_moe": False, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True, "norm_topk_prob": True,
}


def minimind_state_dict(moe: bool, seed: int = 0) -> dict:
    """Keys as MiniMindForCausalLM.state_dict() writes them, saved the way MiniMind saves them:
    half precision, wrapped by DDP and torch.compile, lm_head tied to the embedding."""
    g = torch.Generator().manual_seed(seed)
    h, kv_dim, vocab = 32, 2 * 4, 96  # 8 heads of 4; 2 kv heads
    inter = 64 * ((int(h * 8 / 3) + 63) // 64)  # MiniMind's FeedForward rule: 128

    def w(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ffn(prefix):
        return {f"{prefix}.gate_proj.weight": w(inter, h), f"{prefix}.up_proj.weight": w(inter, h),
                f"{prefix}.down_proj.weight": w(h, inter)}

    sd = {"model.embed_tokens.weight": w(vocab, h, scale=1.0)}
    for i in range(2):
        p = f"model.layers.{i}"
        sd |= {f"{p}.self_attn.q_proj.weight": w(h, h),
               f"{p}.self_attn.k_proj.weight": w(kv_dim, h),
               f"{p}.self_attn.v_proj.weight": w(kv_dim, h),
               f"{p}.self_attn.o_proj.weight": w(h, h),
               f"{p}.input_layernorm.weight": 1 + w(h, scale=0.1),
               f"{p}.post_attention_layernorm.weight": 1 + w(h, scale=0.1)}
        if moe:
            sd[f"{p}.mlp.gate.weight"] = w(4, h)
            for e in range(4):
                sd |= ffn(f"{p}.mlp.experts.{e}")
            sd |= ffn(f"{p}.mlp.shared_experts.0")
        else:
            sd |= ffn(f"{p}.mlp")
    sd["model.norm.weight"] = 1 + w(h, scale=0.1)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: state_dict lists it twice
    return {f"module._orig_mod.{k}": v.half() for k, v in sd.items()}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("with_config", [True, False], ids=["config.json", "shapes"])
def test_minimind_pth_loads_and_runs(tmp_path, moe, with_config):
    sd = minimind_state_dict(moe)
    torch.save(sd, tmp_path / "full_sft_32.pth")
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({**MINIMIND_CONFIG, "use_moe": moe}))
    model = load_model(tmp_path / "full_sft_32.pth", config=None if with_config else "minimind2")
    c = model.config
    assert (c.model_type, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        "minimind", 8, 2, 4)
    assert (c.intermediate_size, c.use_moe, c.tie_word_embeddings) == (128, moe, True)
    if moe:
        assert (c.num_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 2, 1)
    own = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(own[key.removeprefix("module._orig_mod.")], value.float()), key
    ids = torch.randint(0, 96, (2, 12))
    out = model.train()(ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert (out.aux_loss.item() > 0) == moe


def test_minimind_qk_norm_is_read_from_the_weights(tmp_path):
    sd = minimind_state_dict(moe=False)
    for i in range(2):
        for n in "qk":
            sd[f"model.layers.{i}.self_attn.{n}_norm.weight"] = torch.rand(4) + 0.5
    torch.save(sd, tmp_path / "m.pth")
    for config in (MINIMIND_CONFIG, "minimind3"):  # MiniMind's configs have no flag for it
        model = load_model(tmp_path / "m.pth", config=config)
        assert model.config.qk_norm and model.config.head_dim == 4
        assert torch.equal(model.model.layers[1].self_attn.k_norm.weight,
                           sd["model.layers.1.self_attn.k_norm.weight"].float())


def test_minimind_dense_equals_transformers_llama(tmp_path):
    # MiniMind's dense decoder is Llama's computation: same weights, same logits
    torch.save(minimind_state_dict(moe=False), tmp_path / "m.pth")
    ours = load_model(tmp_path / "m.pth", config=MINIMIND_CONFIG)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e6,
        tie_word_embeddings=True)).eval()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) <= TOL


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_one_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = minimind_state_dict(moe=False)
    del sd["module._orig_mod.model.layers.1.mlp.up_proj.weight"]
    sd["module._orig_mod.model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["module._orig_mod.model.norm.weight"] = torch.zeros(31)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(WeightsError) as err:
        load_model(tmp_path / "m.pth", config=MINIMIND_CONFIG)
    msg = str(err.value)
    assert "m.pth" in msg
    assert "missing 1: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected 1: model.layers.0.self_attn.extra.weight" in msg
    assert "mis-shaped 1: model.norm.weight (31,) (expected (32,))" in msg


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    sd = minimind_state_dict(moe=False)
    sd["module._orig_mod.lm_head.weight"] = sd["module._orig_mod.lm_head.weight"] + 1
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(WeightsError, match="tie_word_embeddings"):
        load_model(tmp_path / "m.pth", config=MINIMIND_CONFIG)
    # with the sizes read from the shapes: two different matrices, so untied
    assert not load_model(tmp_path / "m.pth", config="minimind2").config.tie_word_embeddings


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        load_model(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out


def test_missing_files_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path / "empty")
    save_model(CausalLM(ModelConfig(**SMALL)), tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",\n "hidden_act": "gelu"}')
    with pytest.raises(ValueError, match="config.json.*hidden_act"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["m.pth", "m.safetensors"])
def test_a_weight_that_overflows_the_dtype_is_refused(tmp_path, name):
    # float64 1e300 is finite as stored but inf in float32: both loaders check after the cast
    from safetensors.torch import save_file
    cfg = ModelConfig(**SMALL)
    sd = {k: v.double().clone() for k, v in CausalLM(cfg).state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e300
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    if name.endswith(".pth"):
        torch.save(sd, tmp_path / name)
    else:
        save_file(sd, tmp_path / name)
    with pytest.raises(WeightsError, match="up_proj.weight"):
        load_model(tmp_path / name, dtype="float32")
    assert load_model(tmp_path / name, dtype="float64").config.hidden_size == 32
