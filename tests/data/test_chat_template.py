"""A model's own chat template: ids equal transformers' apply_chat_template, the mask is exactly
the assistant replies, and the command line works on a model without ChatML tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from helpers import CHATS, TEXTS, tiny_model, write_jsonl
from minilora.cli import main
from minilora.data.tokenizer import Tokenizer
from minilora.model.io import save_model

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) "
    "or (message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' "
    "+ '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = \"\" %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = \"model\" %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# MiniMind's current template without its tool branch: an empty <think> block in every reply.
MINIMIND = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = message.content %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + "
    "content.lstrip('\\n') }}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "{%- endif %}"
)

# name: (template, specials in the vocabulary, bos, eos, end-of-turn marker of a reply)
STYLES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                None, "<|im_end|>", "<|im_end|>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", "<end_of_turn>"),
    "minimind": (MINIMIND, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 "<|im_start|>", "<|im_end|>", "<|im_end|>"),
}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! <|im_end|> is text here"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, 四."},
]


def write_tokenizer(folder: Path, style: str) -> Path:
    """A byte-level BPE with the style's special tokens and its chat template, as a model folder
    of that family would hold it."""
    template, specials, bos, eos, _ = STYLES[style]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for chat in CHATS for m in chat] + TEXTS
    tok.train_from_iterator(texts * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": specials[0], "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def transformers_ids(folder: Path, messages: list[dict], add_generation_prompt: bool
                     ) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    out = hf.apply_chat_template(messages, tokenize=True,
                                 add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def conversation_for(style: str) -> list[dict]:
    # Gemma's template folds the system message into the first user turn; all take it.
    return [dict(m) for m in CONVERSATION]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_ids_equal_transformers_apply_chat_template(tmp_path: Path, style: str) -> None:
    folder = write_tokenizer(tmp_path / style, style)
    tok = Tokenizer.from_file(folder)
    messages = conversation_for(style)
    ids, _ = tok.encode_chat(messages)
    assert ids == transformers_ids(folder, messages, False)
    prompt, prompt_mask = tok.encode_chat(messages[:4], add_generation_prompt=True)
    assert prompt == transformers_ids(folder, messages[:4], True)
    assert not any(prompt_mask)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_mask_is_exactly_the_assistant_replies(tmp_path: Path, style: str) -> None:
    folder = write_tokenizer(tmp_path / style, style)
    tok = Tokenizer.from_file(folder)
    marker = STYLES[style][4]
    ids, mask = tok.encode_chat(conversation_for(style))
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    replies = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert replies == [f"Hello there.{marker}", f"Four, 四.{marker}"]


def test_end_of_turn_token_stops_generation(tmp_path: Path) -> None:
    tok = Tokenizer.from_file(write_tokenizer(tmp_path / "gemma", "gemma"))
    assert tok.token_to_id("<end_of_turn>") in tok.stop_token_ids
    assert tok.token_to_id("<eos>") in tok.stop_token_ids


def test_template_error_is_one_clear_line(tmp_path: Path) -> None:
    from minilora.core.errors import ConfigError

    tok = Tokenizer.from_file(write_tokenizer(tmp_path / "gemma", "gemma"))
    with pytest.raises(ConfigError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_tokenizer(tmp_path_factory.mktemp("llama") / "model", "llama3")
    tok = Tokenizer.from_file(folder)
    save_model(tiny_model(tok.vocab_size), folder)
    return folder


def test_cli_chat_generate_and_train_on_a_model_without_chatml(
        llama_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert Tokenizer.from_file(llama_folder).token_to_id("<|im_end|>") is None
    base = ["--model", str(llama_folder), "--max-new-tokens", "3"]
    assert main(["generate", *base, "--raw", "Hello"]) == 0
    assert main(["generate", *base, "What is your name?"]) == 0
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS * 4])
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS * 2])
    for data in (texts, chats):
        code = main(["train", "--model", str(llama_folder), "--data", str(data), "--out",
                     str(tmp_path / data.stem), "--max-steps", "2", "--batch-size", "4"])
        assert code == 0
    err = capsys.readouterr().err
    assert "ChatML" not in err
