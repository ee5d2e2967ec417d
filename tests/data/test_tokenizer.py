"""data/tokenizer.py: training, ChatML text, the assistant mask, files, transformers agreement."""

import json

import pytest

from minilora.data.tokenizer import Tokenizer, train_tokenizer

CORPUS = [
    "Hello there, how are you today?",
    "I am fine, thank you. The weather is nice.",
    "What is two plus two? Two plus two is four.",
    "用中文也可以。你好，世界！",
] * 20

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, 四."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def runs(ids, mask, value):
    """The maximal runs of ids whose mask equals value."""
    out, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_specials_sit_where_minimind_puts_them(tok):
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.im_start_id, tok.im_end_id) == (1, 2)
    assert tok.vocab_size == 300
    text = "Hello there, 你好！ unseen: ¿ü?"
    assert tok.decode(tok.encode(text)) == text  # byte level: nothing is unknown


def test_chat_template_text(tok):
    text = tok.apply_chat_template(TWO_TURNS[:3], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\nHello there.<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_encode_chat_masks_exactly_the_assistant_replies(tok):
    ids, mask = tok.encode_chat(TWO_TURNS)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    counted = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, 1)]
    assert counted == ["Hello there.<|im_end|>", "Four, 四.<|im_end|>"]
    ignored = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, 0)]
    assert ignored == [
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n",
        "\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    # the ids are those of the template text (segment encoding changes nothing on this text)
    assert ids == tok.encode(tok.apply_chat_template(TWO_TURNS))
    gen_ids, gen_mask = tok.encode_chat(TWO_TURNS[:2], add_generation_prompt=True)
    assert tok.decode(gen_ids, skip_special_tokens=False) == tok.apply_chat_template(
        TWO_TURNS[:2], add_generation_prompt=True)
    assert sum(gen_mask) == 0


@pytest.mark.parametrize("messages,where", [
    ("hello", "messages"),
    ([{"role": "user"}], r"messages\[0\].content"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], r"messages\[1\].role"),
    ([{"role": "us\ner", "content": "a"}], r"messages\[0\].role"),
])
def test_bad_messages_are_named(tok, messages, where):
    with pytest.raises(ValueError, match=where):
        tok.encode_chat(messages)


def test_save_load_and_specials_from_tokenizer_config(tok, tmp_path):
    folder = tok.save(tmp_path / "tok")
    again = Tokenizer.from_file(folder)
    assert again.encode("Hello there") == tok.encode("Hello there")
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 0)
    assert Tokenizer.from_file(folder / "tokenizer.json").eos_token_id == 2
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|endoftext|>", "special": True}  # transformers' dict form
    config["bos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    again = Tokenizer.from_file(folder)
    assert (again.eos_token_id, again.bos_token_id) == (0, None)
    config["pad_token"] = "<|nope|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_config.json.*pad_token '<|nope|>'"):
        Tokenizer.from_file(folder)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "missing")


def test_transformers_reads_the_saved_folder_the_same_way(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path / "tok"))
    text = tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True)
    assert hf.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True) == text
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_train_tokenizer_refuses_a_vocab_without_room():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
