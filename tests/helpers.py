"""Tiny shared fixtures for the data and training tests: jsonl writing, a tokenizer, a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A few short conversations: enough text to train a tiny BPE tokenizer on and to overfit.
CHATS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am Mini, made by the minilora team."},
    ],
    [
        {"role": "user", "content": "Who made you?"},
        {"role": "assistant", "content": "The minilora team made me."},
    ],
    [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "And 4 and 4?"},
        {"role": "assistant", "content": "4 + 4 = 8."},
    ],
    [
        {"role": "user", "content": "Reverse the word cat."},
        {"role": "assistant", "content": "tac"},
    ],
    [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
    ],
    [
        {"role": "user", "content": "Upper-case the word dog."},
        {"role": "assistant", "content": "DOG"},
    ],
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn a name.",
    "LoRA adds a low-rank update beside a frozen weight.",
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows to path: dicts/lists as JSON, str as the raw line, bytes as raw bytes."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def chat_rows(key: str = "conversations", repeat: int = 1) -> list[dict]:
    """CHATS as jsonl rows under ``key`` ("conversations" or "messages")."""
    return [{key: chat} for _ in range(repeat) for chat in CHATS]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on CHATS and TEXTS (no download)."""
    from minilora.data.tokenizer import train_tokenizer

    texts = [m["content"] for chat in CHATS for m in chat] + TEXTS
    return train_tokenizer(texts * 4, vocab_size=400)


def tiny_model(vocab_size: int, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A 2-layer CausalLM with hidden 32, initialized from ``seed``."""
    import torch

    from minilora.model.decoder import CausalLM, ModelConfig

    torch.manual_seed(seed)
    config = ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = CausalLM(config)
    # The default N(0, 0.02) embedding, tied to lm_head, caps a 32-wide model's logits near
    # +-0.6, so LoRA (which leaves the head frozen) could barely move the loss; a wider one
    # gives it room.
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.2)
    return model


def add_random_adapter(model: Any, name: str, seed: int, targets: Any) -> None:
    """An adapter whose B is not zero (seeded), so its answers differ from the base's."""
    import torch

    from minilora.lora.injection import inject_lora
    from minilora.lora.layer import LoraConfig, lora_modules

    torch.manual_seed(100 + seed)  # inject_lora draws A from the global generator
    inject_lora(model, LoraConfig(r=4, alpha=8, targets=targets), name=name)
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        if name in m.lora_A:
            b = m.lora_B[name].weight
            b.data.copy_(torch.randn(b.shape, generator=g) * 2.0)


def fit(model: Any, tokenizer: Any, config: Any, **kwargs: Any) -> Any:
    """train() on the files the config names, read with ``tokenizer``; kwargs go to train()."""
    from minilora.training.datasets import load_datasets
    from minilora.training.loop import train

    train_set, eval_set = load_datasets(config, tokenizer)
    return train(model, train_set, config, eval_set, **kwargs)


def tiny_base_folder(root: Path, repeat: int = 1) -> Path:
    """``root/base`` (a tiny model and its tokenizer, saved as a user's model folder) and
    ``root/train.jsonl`` (CHATS, ``repeat`` times); returns root."""
    from minilora.model.io import save_model

    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer.vocab_size), root / "base")
    tokenizer.save(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows(repeat=repeat))
    return root


def run_cli(argv: list[str], capsys: Any, stdin: str | None = None,
            monkeypatch: Any = None) -> tuple[int, str, str]:
    """``minilora ARGV`` in this process: (exit code, stdout, stderr); `stdin` (with pytest's
    monkeypatch) is what the command reads from standard input."""
    import io
    import sys

    from minilora.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_llama(vocab_size: int, tied: bool, seed: int = 0) -> Any:
    """A tiny transformers LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads), in eval
    mode: the reference model of the PEFT parity tests."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied)).eval()


def minilora_twin(hf: Any) -> Any:
    """minilora's CausalLM holding a transformers model's weights."""
    from minilora.model.decoder import CausalLM, ModelConfig

    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    ours = CausalLM(config).eval()
    sd = hf.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    _, unexpected = ours.load_state_dict(sd, strict=False)
    assert unexpected == []
    return ours
