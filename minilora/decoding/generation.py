"""Generation: sampling a token from logits, and generate / stream_generate / generate_batch.

Each call sizes one KVCache for the whole answer up front, prefills the prompt and decodes a token
at a time; sampling follows transformers' processor order (repetition penalty, temperature,
top-k, top-p, min-p).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from minilora.core.errors import ConfigError
from minilora.decoding.sampling import sampling_problems
from minilora.decoding.stops import held_back
from minilora.model.decoder import CausalLM
from minilora.model.kv_cache import KVCache

# New-token room the KV cache starts with: a generous --max-new-tokens (a stop token usually ends
# the reply long before) must not allocate its whole cache up front; the cache doubles when full.
FIRST_CAPACITY = 1024


def generate(model: CausalLM, input_ids: Sequence[int] | Tensor, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             stop: Sequence[Sequence[int]] | None = None, seed: int | None = None) -> list[int]:
    """Continues one sequence; returns the new tokens (arguments as in ``stream_generate``)."""
    return list(stream_generate(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, stop=stop, seed=seed))


@torch.inference_mode()
def stream_generate(model: CausalLM, input_ids: Sequence[int] | Tensor, *,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    eos_token_id: int | Sequence[int] | None = None,
                    stop: Sequence[Sequence[int]] | None = None,
                    seed: int | None = None) -> Iterator[int]:
    """Continues one sequence with a KV cache, yielding each new token as soon as it is final.

    Args:
        model: the model (its mode is left as it is).
        input_ids: the prompt, a list of ids or a (T,) / (1, T) tensor.
        max_new_tokens: most tokens to produce.
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / t).
        top_k: sample among the k most likely tokens only (0 = all).
        top_p: sample among the smallest set of tokens whose probability reaches top_p (1 = all).
        min_p: sample among the tokens at least min_p times as likely as the most likely one
            (after temperature, top-k and top-p; 0 = all).
        repetition_penalty: transformers' rule: a logit of a token already in the prompt or output
            is divided by it (multiplied when negative); 1 = off.
        eos_token_id: id(s) that end generation; not yielded. None: generation never stops early.
        stop: token id sequences that end generation; not yielded. Tokens that could begin one
            are held back until they cannot.
        seed: seeds the sampling generator, so the same call gives the same tokens.

    Yields:
        New token ids.

    Generation stops at the end of the model's context (``fit_context``).

    Raises:
        ConfigError: on an empty prompt, a prompt that fills the model's context, or an
            out-of-range argument (naming it).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    stops = [list(s) for s in stop or []]
    if any(not s for s in stops):
        raise ConfigError("stop: every stop sequence needs at least one token")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    weight = model.model.embed_tokens.weight
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=weight.device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ConfigError("input_ids: the prompt is empty")
    _check_ids(ids, weight.shape[0])
    max_new_tokens = fit_context(model, ids.shape[1], max_new_tokens)
    if max_new_tokens == 0:
        return
    pending: list[int] = []  # tokens that may begin a stop sequence
    for t in _next_tokens(model, ids, max_new_tokens, seed, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty):
        if t in eos:
            break
        pending.append(t)
        done = max((len(s) for s in stops if pending[-len(s):] == s), default=0)
        if done:  # a stop sequence ends here; what came before it is final
            yield from pending[:-done]
            return
        keep = held_back(pending, stops)
        yield from pending[: len(pending) - keep]
        pending = pending[len(pending) - keep:]
    yield from pending


def fit_context(model: CausalLM, prompt_tokens: int, max_new_tokens: int) -> int:
    """How many new tokens fit in the model's context after a prompt: ``max_new_tokens``, or
    fewer where the context (``max_position_embeddings``) ends first; generation stops there,
    as transformers' ``max_length`` does.

    Raises:
        ConfigError: the prompt alone fills the context (a model computes nothing meaningful
            past the positions it was trained on).
    """
    context = model.config.max_position_embeddings
    if prompt_tokens >= context:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens, but the model's context "
                          f"(max_position_embeddings) is {context} tokens, which leaves no room "
                          "for a reply; shorten the prompt")
    return min(max_new_tokens, context - prompt_tokens)


def _next_tokens(model: CausalLM, ids: Tensor, max_new_tokens: int, seed: int | None, *,
                 temperature: float, top_k: int, top_p: float, min_p: float,
                 repetition_penalty: float) -> Iterator[int]:
    """Each next token of one (1, T) prompt, decoded with a KV cache sized for them all."""
    weight = model.model.embed_tokens.weight
    generator = None
    if seed is not None:
        generator = torch.Generator(device=weight.device).manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)  # (V,)
        seen[ids[0]] = True
    cache = KVCache(model.config, 1, ids.shape[1] + min(max_new_tokens, FIRST_CAPACITY),
                    device=weight.device, dtype=weight.dtype)
    logits = model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]  # (V,)
    for step in range(max_new_tokens):
        token = pick_token(logits, seen=seen, generator=generator, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty)
        yield int(token)
        if step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[token] = True
        logits = model(token.view(1, 1), past_key_values=cache, logits_to_keep=1).logits[0, -1]


@torch.inference_mode()
def generate_batch(model: CausalLM, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                   eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                   **forward_kwargs: object) -> list[list[int]]:
    """Continues several prompts in one batch; returns each one's new tokens.

    Prompts are left-padded and the padding masked. Rotary attention depends only on the
    distance between positions, so each row gets the tokens ``generate`` gives it alone (greedy,
    up to float rounding; sampling draws from one generator for the whole batch).

    Args:
        model: the model.
        prompts: one list of token ids per row.
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id, seed:
            as in
            ``stream_generate``; a row that meets an eos token stops growing.
        **forward_kwargs: passed to every forward, e.g. ``adapter_names=[...]`` (one LoRA adapter
            per row, see minilora.lora.named.mixed_adapters).

    Returns:
        The new tokens of each row (eos not included).

    Raises:
        ConfigError: on an empty prompt list or prompt, a prompt that fills the model's context
            (generation stops at its end), or an out-of-range argument.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: expected a non-empty list of non-empty prompts")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    weight = model.model.embed_tokens.weight
    max_new_tokens = fit_context(model, max(len(p) for p in prompts), max_new_tokens)
    ids, mask = left_padded(prompts, min(max_new_tokens, FIRST_CAPACITY), weight.device)
    _check_ids(ids, weight.shape[0])
    B, L = ids.shape
    generator = None if seed is None else torch.Generator(weight.device).manual_seed(seed)
    seen = None  # (B, V): the tokens each row's repetition penalty applies to
    if repetition_penalty != 1.0:
        seen = _seen_rows(prompts, weight.shape[0], weight.device)
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    cache = KVCache(model.config, B, L + min(max_new_tokens, FIRST_CAPACITY), device=weight.device,
                    dtype=weight.dtype)
    logits = model(ids, attention_mask=mask[:, :L], past_key_values=cache, logits_to_keep=1,
                   **forward_kwargs).logits[:, -1]  # (B, V)
    done = [False] * B
    for step in range(max_new_tokens):
        tokens = torch.stack([pick_token(
            logits[i], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seen=None if seen is None else seen[i],
            generator=generator) for i in range(B)])  # (B,)
        for i, t in enumerate(tokens.tolist()):
            done[i] = done[i] or t in eos
            if not done[i]:
                out[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B), tokens] = True
        if L + step == mask.shape[1]:  # out of room: twice as much, as the cache grows
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=1)
        mask[:, L + step] = 1
        logits = model(tokens.view(B, 1), attention_mask=mask[:, :L + step + 1],
                       past_key_values=cache, logits_to_keep=1,
                       **forward_kwargs).logits[:, -1]  # (B, V)
    return out


def _seen_rows(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device
               ) -> Tensor:
    """(B, V) bool: True at each prompt's own tokens."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, list(p)] = True
    return seen


def left_padded(rows: Sequence[Sequence[int]], room: int = 0,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token rows of different lengths as one batch, left-padded (with id 0) to the longest, so
    each row's newest token is the last column: the one left-padding of ``generate_batch`` and
    the server's chunked prefill.

    Args:
        rows: token ids per row (each non-empty).
        room: mask columns added after the tokens, for the new tokens to come (0 by default).
        device: where the tensors go.

    Returns:
        (B, L) long ids and (B, L + room) long mask: 1 at each row's own tokens, 0 on its
        padding and on the room.
    """
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)  # (B, L)
    mask = torch.zeros(B, L + room, dtype=torch.long, device=device)  # (B, L + room)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, L - len(r):L] = 1
    return ids, mask


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    min_p: float, repetition_penalty: float, seed: int | None) -> None:
    """Every sampling setting finite and in range (NaN passes every comparison): SamplingParams'
    check, and the length and seed."""
    problems = sampling_problems(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repetition_penalty=repetition_penalty)
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0):
        problems.append(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        problems.append(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_ids(ids: Tensor, vocab_size: int) -> None:
    """Token ids the embedding has rows for (a tokenizer larger than the model has others)."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"the prompt holds token ids outside the model's vocabulary (0 .. "
                          f"{vocab_size - 1}, found {low} .. {high}); the tokenizer does not "
                          "belong to this model")


def pick_token(logits: Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, repetition_penalty: float = 1.0, seen: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """The next token from one row of logits, with transformers' processor order.

    Args:
        logits: (V,) logits of the next position.
        temperature, top_k, top_p, min_p, repetition_penalty: as in ``stream_generate`` (not
            checked here: ``stream_generate`` checks them once per call).
        seen: (V,) bool, the tokens the repetition penalty applies to; None: no penalty.
        generator: the generator sampling draws from (None: torch's global one).

    Returns:
        The token id, a 0-dim long tensor on the logits' device.
    """
    if seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty,
                                logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)  # (V,)
    if temperature == 0:
        return logits.argmax()
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p)
    return torch.multinomial(probs, 1, generator=generator)[0]


def sampling_probs(logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> Tensor:
    """The distribution a token is sampled from (temperature > 0), in transformers' order:
    temperature, top-k, top-p, min-p; each filter keeps at least the most likely token.

    Args:
        logits: (V,) logits (after any repetition penalty).
        temperature, top_k, top_p, min_p: as in ``stream_generate``.

    Returns:
        (V,) float32 probabilities, zero where a filter dropped the token.
    """
    logits = logits.float() / temperature  # (V,)
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # (V,)
        drop[-1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)  # (V,)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits.softmax(-1)  # (V,)
