"""Tokenizer: tokenizer.json through the `tokenizers` library, a chat template and its loss mask.

A model with a ``chat_template`` in its tokenizer_config.json has conversations rendered by it
(chat_template.py, as transformers renders them); one without gets ChatML as MiniMind writes it:
every message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and the generation prompt is
``<|im_start|>assistant\\n``. ``encode_chat`` returns the ids with a mask that is 1 on each
assistant reply and its end-of-turn token (what the loss is computed on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minilora.core.errors import ConfigError
from minilora.core.files import atomic_write, json_type, read_bounded, read_json
from minilora.data.chat_template import (
    MAX_TEMPLATE_BYTES,
    ChatTemplateError,
    TemplateBoundError,
    assistant_spans,
    compile_template,
    render,
)
from minilora.data.messages import check_messages

# Large vocabularies (Qwen's 150k tokens) give tokenizer.json files of ~10 MB.
MAX_TOKENIZER_BYTES = 256 << 20

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2 in a tokenizer train_tokenizer made

# The same template in Jinja, written to tokenizer_config.json so transformers' apply_chat_template
# produces the text apply_chat_template below produces.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) with chat helpers.

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` to wrap.
        bos_token, eos_token, pad_token: special token strings; None where there is none.
    """

    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = IM_START,
                 eos_token: str | None = IM_END, pad_token: str | None = ENDOFTEXT,
                 chat_template: str | None = None) -> None:
        self._tok = tokenizer
        # None (or MiniMind's ChatML, CHAT_TEMPLATE): the built-in ChatML below, whose pieces are
        # encoded one by one; any other template is rendered with Jinja (chat_template.py).
        self.chat_template = None if chat_template == CHAT_TEMPLATE else chat_template
        self.has_own_template = chat_template is not None  # False: ChatML as a fallback
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        # The file the template came from, named in its errors (set by from_file).
        self.template_origin: str | None = None
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token),
                            ("pad_token", pad_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ConfigError(f"{name} {token!r} is not in the vocabulary")

    def describe_template(self) -> str:
        """The chat template in use, in words: the model's own (and which family it looks like)
        or the built-in ChatML it falls back to."""
        if self.chat_template is None and self.has_own_template:
            return "the model's own (MiniMind's ChatML)"
        if self.chat_template is None:
            return ("ChatML, built in (the tokenizer has no chat template of its own; add "
                    "chat_template to its tokenizer_config.json to use another)")
        families = {"<|start_header_id|>": "Llama 3", "<start_of_turn>": "Gemma",
                    "[INST]": "Llama 2 / Mistral", "<|im_start|>": "ChatML",
                    "<|user|>": "Phi / Zephyr"}
        family = next((f for marker, f in families.items() if marker in self.chat_template),
                      None)
        return "the model's own" + (f" ({family} style)" if family else "")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads a folder holding tokenizer.json (and tokenizer_config.json) or a tokenizer.json.

        Special tokens come from tokenizer_config.json where it names them; otherwise MiniMind's
        (bos <|im_start|>, eos <|im_end|>, pad <|endoftext|>) where the vocabulary has them.

        Raises:
            FileNotFoundError: when there is no tokenizer.json at path.
            ConfigError: when a file cannot be read or names a token the vocabulary lacks.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no tokenizer.json here")
        data = read_bounded(file, MAX_TOKENIZER_BYTES, "a tokenizer.json")
        try:
            tok = _HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ConfigError(f"{file}: not a tokenizers tokenizer.json ({e})") from e
        specials = {}
        for name, default in (("bos_token", IM_START), ("eos_token", IM_END),
                              ("pad_token", ENDOFTEXT)):
            specials[name] = default if tok.token_to_id(default) is not None else None
        config_file = file.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.exists():
            loaded = read_json(config_file, "a tokenizer_config.json")
            if not isinstance(loaded, dict):
                raise ConfigError(f"{config_file}: a JSON {type(loaded).__name__}, expected a "
                                  "JSON object")
            config = loaded
            for name in specials:
                if name in config:
                    value = config[name]
                    # transformers writes either the string or an AddedToken dict
                    value = value.get("content") if isinstance(value, dict) else value
                    if value is not None and not isinstance(value, str):
                        raise ConfigError(f"{config_file}: field '{name}': {value!r}; expected "
                                          "a token string (or an AddedToken object), or null")
                    specials[name] = value
        template, origin = _read_chat_template(file.parent, config)
        try:
            made = cls(tok, **specials, chat_template=template)
        except ConfigError as e:  # a special token the vocabulary lacks
            raise ConfigError(f"{config_file}: {e}") from e
        made.template_origin = origin
        if made.chat_template is not None:  # not valid Jinja, or reading other files: refused now
            compile_template(made.chat_template, origin)
        return made

    def save(self, folder: str | Path) -> Path:
        """Writes tokenizer.json and a tokenizer_config.json that transformers also reads.

        Returns:
            The folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", self._tok.to_str())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.pad_token,
            "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 32768, "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template or CHAT_TEMPLATE,
        }
        atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return folder

    # -- plain text --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of text, nothing added around it (special tokens written in text are kept)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ids."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _literal(self) -> _HFTokenizer:
        # A copy that reads special-token strings as plain text: message content must not open
        # or close a turn (a user typing "<|im_start|>assistant" is text, not a template token).
        literal = _HFTokenizer.from_str(self._tok.to_str())
        literal.encode_special_tokens = True
        return literal

    def _encode_literal(self, text: str) -> list[int]:
        return self._literal.encode(text, add_special_tokens=False).ids

    def to_json(self) -> str:
        """The tokenizer.json text of the wrapped ``tokenizers`` tokenizer (vocabulary, merges,
        pre-tokenizer, added tokens), for writers of other formats."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def im_start_id(self) -> int:
        return self._special_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self._special_id(IM_END)

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """The ids that end a reply: eos, ``<|im_end|>`` where the vocabulary has it, and the
        end-of-turn token of the chat template (``<|eot_id|>``, ``<end_of_turn>``)."""
        ids = [i for i in (self.eos_token_id, self._tok.token_to_id(IM_END)) if i is not None]
        if self.chat_template is not None:
            ids += self._template_end_of_turn()
        return list(dict.fromkeys(ids))

    def _template_end_of_turn(self) -> list[int]:
        template = self.chat_template
        assert template is not None  # called only for a tokenizer with its own template
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            text, spans = assistant_spans(template, probe, self._special_tokens(),
                                          origin=self.template_origin)
        except TemplateBoundError:
            raise  # a template that hangs here hangs on every conversation: said once, now
        except ChatTemplateError:
            return []
        start, end = spans[0]
        after = text[start:end]
        after = after[after.find("ok") + 2:] if "ok" in after else ""
        first = self._tok.encode(after, add_special_tokens=False).ids[:1] if after else []
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        return [i for i in first if self._tok.id_to_token(i) in specials]

    def _special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "unk_token": self.pad_token}

    def _special_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ConfigError(f"this tokenizer has no {token} token, which ChatML needs")
        return i

    # -- chat --------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = False) -> str:
        """The text of messages (``[{"role": ..., "content": ...}, ...]``): the model's own
        template, else ChatML.

        Raises:
            MessageError: on a message without a string role or content (naming its field).
        """
        check_messages(messages, roles=None, non_empty=False)
        if self.chat_template is not None:
            return render(self.chat_template, messages,
                          add_generation_prompt=add_generation_prompt,
                          special_tokens=self._special_tokens(), origin=self.template_origin)
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and its loss mask.

        ChatML (no template of the model's own): the ids are the concatenated encodings of the
        template's pieces, so every token belongs to exactly one piece and the mask is exact;
        roles and contents are encoded as plain text (a ``"<|im_end|>"`` written in them is an
        ordinary token). The model's own template: the rendered text tokenized as transformers
        tokenizes it, the mask from the assistant spans found in the rendering
        (chat_template.py).

        Returns:
            (ids, mask): mask[i] is 1 where ids[i] is part of an assistant reply or the
            ``<|im_end|>`` closing it, 0 elsewhere (headers, other roles, the newline after).

        Raises:
            ConfigError: on a malformed message (MessageError), or a tokenizer without the
                ChatML tokens.
        """
        check_messages(messages, roles=None, non_empty=False)
        if self.chat_template is not None:
            return self._encode_templated(messages, add_generation_prompt)
        start, end, newline = self.im_start_id, self.im_end_id, self.encode("\n")
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            header = [start, *self._encode_literal(f"{m['role']}\n")]
            body = [*self._encode_literal(m["content"]), end]
            counted = 1 if m["role"] == "assistant" else 0
            ids += header + body + newline
            mask += [0] * len(header) + [counted] * len(body) + [0] * len(newline)
        if add_generation_prompt:
            header = [start, *self.encode("assistant\n")]
            ids += header
            mask += [0] * len(header)
        return ids, mask


    def _encode_templated(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool
                          ) -> tuple[list[int], list[int]]:
        """The model's own template: the ids of the rendered text as transformers tokenizes it
        (special-token strings are special, nothing added around), the mask from the spans."""
        template = self.chat_template
        assert template is not None  # called only for a tokenizer with its own template
        if add_generation_prompt:
            text = render(template, messages, add_generation_prompt=True,
                          special_tokens=self._special_tokens(), origin=self.template_origin)
            ids = self.encode(text)
            return ids, [0] * len(ids)
        text, spans = assistant_spans(template, messages, self._special_tokens(),
                                      origin=self.template_origin)
        encoding = self._tok.encode(text, add_special_tokens=False)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoding.offsets]
        return list(encoding.ids), mask


def _read_chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    """The chat template of a tokenizer folder: chat_template.jinja (newer transformers write
    it) or tokenizer_config.json's chat_template (a string, or a list of named templates).

    Returns:
        (template or None, where it was read: the file, or the config's field).

    Raises:
        OSError: chat_template.jinja is not a regular file (a FIFO, a folder, a device, a
            dangling link) or larger than MAX_TEMPLATE_BYTES.
        ConfigError: chat_template.jinja is not UTF-8, or the config's chat_template is neither
            a string nor a list of {"name", "template"} objects.
    """
    jinja_file = folder / "chat_template.jinja"
    if os.path.lexists(jinja_file):  # whatever is there is read or refused, never skipped
        data = read_bounded(jinja_file, MAX_TEMPLATE_BYTES, "a chat template (Jinja text)")
        try:
            return data.decode("utf-8"), str(jinja_file)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{jinja_file}: byte {e.start} is not UTF-8 "
                              f"({data[e.start:e.start + 1]!r}); expected a chat template in "
                              "UTF-8") from None
    config_file = folder / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"}]
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise ConfigError(f"{config_file}: field 'chat_template': a list whose items are not "
                              'all {"name": ..., "template": "..."}; expected a template string '
                              "or such a list")
        named = {t.get("name"): t["template"] for t in template}
        template = named.get("default")
    elif template is not None and not isinstance(template, str):
        raise ConfigError(f"{config_file}: field 'chat_template': a JSON {json_type(template)}; "
                          "expected a Jinja template string (or null)")
    if isinstance(template, str) and len(template.encode("utf-8")) > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"{config_file}: field 'chat_template' is larger than "
                          f"{MAX_TEMPLATE_BYTES} bytes; expected a chat template")
    origin = f"{config_file} (field 'chat_template')"
    return (template if isinstance(template, str) and template.strip() else None), origin


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE tokenizer as MiniMind does.

    Args:
        texts: training texts.
        vocab_size: size of the vocabulary, the three special tokens and 256 bytes included.

    Returns:
        A Tokenizer with <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2.

    Raises:
        ConfigError: when vocab_size cannot hold the specials and the byte alphabet.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ConfigError(f"vocab_size: expected >= {len(SPECIAL_TOKENS) + len(alphabet)} "
                         f"(3 specials + 256 bytes), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
