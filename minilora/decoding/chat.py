"""Answering chat messages with a model: the reply as text, whole or streamed as it is generated.

`chat_answerer` is what `tasks.score` asks questions through (eval --tasks, train's before/after
table, the recipes); `stream_reply` is one turn of the `chat` command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

from minilora.data.tokenizer import Tokenizer
from minilora.decoding.generation import generate, generate_batch, stream_generate
from minilora.model.decoder import CausalLM


def stream_text(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Decodes a token stream into text pieces as soon as they are whole characters.

    Args:
        tokenizer: decodes the ids.
        tokens: token ids, one at a time (``stream_generate``'s output).

    Returns:
        An iterator of text pieces whose concatenation is the decoded text of all the tokens.
    """
    ids: list[int] = []
    shown = ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown):]


def stream_reply(model: CausalLM, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                 **sampling: Any) -> Iterator[str]:
    """The model's reply to a conversation, streamed as text pieces.

    Args:
        model: the model (in eval mode), with its adapters applied and active as wanted.
        tokenizer: renders the messages with the chat template and decodes the reply.
        messages: the conversation so far, ending with the user's turn.
        **sampling: ``stream_generate``'s settings (max_new_tokens, temperature, eos_token_id...).

    Returns:
        An iterator of text pieces.
    """
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    return stream_text(tokenizer, stream_generate(model, ids, **sampling))


def chat_answerer(model: CausalLM, tokenizer: Tokenizer, **sampling: Any
                  ) -> Callable[[list[dict[str, Any]]], str]:
    """A function from chat messages to the model's whole reply text (for ``tasks.score``).

    Args:
        model: the model (in eval mode).
        tokenizer: renders the messages with the chat template and decodes the reply.
        **sampling: ``generate``'s settings (max_new_tokens, eos_token_id, temperature...).

    Returns:
        answer(messages) -> the reply, stripped of surrounding whitespace.
    """

    def answer(messages: list[dict[str, Any]]) -> str:
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        return tokenizer.decode(generate(model, ids, **sampling)).strip()

    return answer


def sampled_answerer(model: CausalLM, tokenizer: Tokenizer, samples: int, *, seed: int = 0,
                     **sampling: Any) -> Callable[[list[dict[str, Any]]], list[str]]:
    """A function from chat messages to ``samples`` sampled replies (for ``tasks.score``, which
    then scores the share of them that are right), generated as one batch.

    Args:
        model: the model (in eval mode).
        tokenizer: renders the messages with the chat template and decodes the replies.
        samples: replies per question (>= 1).
        seed: the n-th call samples with a seed made from (seed, n): a scoring run repeats.
        **sampling: ``generate_batch``'s settings (max_new_tokens, temperature, top_p, min_p,
            eos_token_id...).

    Returns:
        answer(messages) -> the replies, each stripped of surrounding whitespace.
    """
    calls = 0

    def answer(messages: list[dict[str, Any]]) -> list[str]:
        nonlocal calls
        calls += 1
        digest = hashlib.sha256(f"{seed}:{calls}".encode()).digest()
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        replies = generate_batch(model, [ids] * samples,
                                 seed=int.from_bytes(digest[:8], "little") >> 1, **sampling)
        return [tokenizer.decode(r).strip() for r in replies]

    return answer
