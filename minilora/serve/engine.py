"""Continuous batching across adapters: one loop owns the model and decodes every running request
together, each row with its own LoRA adapter, its own rotary positions and its own KV cache rows.

A request joins between steps: its prompt is prefilled alone (the very computation `generate`
does), its keys and values are copied into a free row of the shared cache (`generate`'s
KVCache), and from then on it decodes with the others. The cache is a timeline of slots that
every row writes at once; a row's own tokens sit in some of those slots (the cache's ``owned``)
and the attention mask hides the rest, while `position_ids` give each token its true position
(so the rotation, and the answer, is what the request gets alone). A finished or cancelled
request leaves at the next step; its row is filled by the last one. When the timeline is full,
every row's slots are packed to the front.

With ``prefill_chunk`` (chunked prefill) a joining request takes a row at once and its prompt is
fed a chunk a step inside the same forward that decodes the others (rows left-padded to the
longest feed, the padding's slots masked), so no step is spent on a prefill alone.

With ``max_loras``, adapters added at run time are evicted least recently used first when more
would be resident, and read back (``reload``) when a request names one; a request whose adapter
finds no free slot (every resident one busy) waits for one.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from minilora.core.errors import ConfigError
from minilora.decoding.generation import left_padded, pick_token
from minilora.decoding.sampling import SamplingParams as Sampling
from minilora.decoding.sampling import sampling_problems
from minilora.decoding.stops import held_back
from minilora.lora.named import delete_adapter, list_adapters, mixed_adapters, set_active
from minilora.model.decoder import CausalLM
from minilora.model.kv_cache import KVCache

FINISH_STOP, FINISH_LENGTH = "stop", "length"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamplingParams(Sampling):
    """How one request is answered: the library's sampling settings (temperature, top_k,
    top_p, min_p; checked by the library's one check) and what a request adds (OpenAI's names).

    max_tokens: most new tokens.
    seed: seeds this request's own generator, so the answer does not depend on the others.
    stop: strings that end the answer (not included in it).
    logprobs: None = off; k >= 0: each chosen token's log-probability and the k likeliest
        tokens' (from the model's distribution, before temperature and top_p).
    ignore_eos: an end-of-turn token does not end the answer (vLLM's; benchmarks use it so
        that every request decodes max_tokens tokens).
    repetition_penalty is not applied by the engine: only its default (1, off) is accepted.
    """

    max_tokens: int
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = sampling_problems(**self.as_kwargs())
        if self.repetition_penalty != 1.0:
            problems.append("repetition_penalty: not applied by the server; leave it at 1")
        if (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                or self.max_tokens < 1):
            problems.append(f"max_tokens: expected an integer >= 1, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop: expected non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"logprobs: expected 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class Event:
    """What the engine tells a request: a piece of text, or the end (finish_reason set), or an
    error (the request is over)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class TokenLogprob:
    """One generated token: its id, its log-probability, and the likeliest (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Request:
    """One generation: prompt ids, the adapter (None: the base), sampling, and where events go.

    ``on_event`` is called from the engine's thread; it must not block.
    """

    def __init__(self, prompt_ids: Sequence[int], adapter: str | None, params: SamplingParams,
                 on_event: Callable[[Event], None]) -> None:
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.on_event = on_event
        self.cancelled = False

    def cancel(self) -> None:
        """Frees the request's row at the next step (any thread may call it)."""
        self.cancelled = True


class _Running:
    """A request in the batch: the token to feed next, its position, its text so far."""

    def __init__(self, request: Request, tokenizer: Any, device: torch.device) -> None:
        self.request = request
        self.position = len(request.prompt_ids)  # the next token's rotary position
        self.token = -1  # the token to feed next
        self.generated: list[int] = []
        self.shown = 0  # characters of the decoded text already sent
        self.logprobs: list[TokenLogprob] = []  # of the tokens not yet sent with an event
        self.fed = len(request.prompt_ids)  # prompt tokens in the cache (chunked prefill)
        seed = request.params.seed
        if seed is None and request.params.temperature > 0:
            seed = random.randrange(2**63)
        self.generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        self.tokenizer = tokenizer

    def add(self, token: int) -> tuple[str, str | None]:
        """Takes one new token; returns (text now final, finish reason or None)."""
        self.generated.append(token)
        self.token = token
        self.position += 1
        text = self.tokenizer.decode(self.generated)
        stops = self.request.params.stop
        cut = min((i for i in (text.find(s, max(0, self.shown - len(s) + 1)) for s in stops)
                   if i >= 0), default=-1)
        if cut >= 0:
            piece, self.shown = text[self.shown:cut], cut
            return piece, FINISH_STOP
        full = len(self.generated) >= self.request.params.max_tokens
        if text.endswith("\ufffd") and not full:  # a character split across tokens
            return "", None
        end = len(text) if full else len(text) - held_back(text, stops)
        piece, self.shown = text[self.shown:end], max(self.shown, end)
        return piece, FINISH_LENGTH if full else None


class Engine:
    """The scheduler: owns the model; `submit` from any thread, `run` (or `step`) in one.

    Args:
        model: the base model, adapters loaded by name; it is put in eval mode and no adapter is
            left active (each request names its own).
        tokenizer: minilora's Tokenizer (decodes the answers, knows the end tokens).
        max_batch: most requests decoded together; the rest wait their turn.
        context: longest prompt + answer a request may have (default: the model's).
        max_loras: most adapters held in the model at once (None: no limit). Adapters added
            with `add_adapter` are evicted, least recently used first, to make room; those the
            model came with stay.
        reload: loads an evicted adapter again by name (in the engine's thread) when a request
            names one that is not in the model; it raises for a name it does not know.
        prefill_chunk: None: a joining request's prompt is prefilled in a forward of its own
            before it decodes with the others. k: prompts are fed k tokens a step inside the
            decode forward (chunked prefill), so a joining request does not stall the running
            ones for a forward of its own.
    """

    def __init__(self, model: CausalLM, tokenizer: Any, *, max_batch: int = 32,
                 context: int | None = None, max_loras: int | None = None,
                 reload: Callable[[str], None] | None = None,
                 prefill_chunk: int | None = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch: expected >= 1, got {max_batch}")
        if max_loras is not None and max_loras < 1:
            raise ConfigError(f"max_loras: expected >= 1, got {max_loras}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk: expected >= 1, got {prefill_chunk}")
        self.max_loras, self.reload, self.prefill_chunk = max_loras, reload, prefill_chunk
        # adapters added at run time, least recently used first: the ones eviction may take
        self._evictable: OrderedDict[str, None] = OrderedDict()
        self._deferred: list[Request] = []  # waiting for an adapter slot to free up
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.context = context or model.config.max_position_embeddings
        if list_adapters(model):
            set_active(model, [])
        self.eos = set(tokenizer.stop_token_ids)  # the chat template's end of turn too
        self.device = model.model.embed_tokens.weight.device
        self.cache = KVCache(model.config, max_batch, min(256, self.context),
                             device=self.device, dtype=model.model.embed_tokens.weight.dtype)
        self.rows: list[_Running] = []
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unloading: set[str] = set()

    # ------------------------------------------------------------ from any thread

    def submit(self, request: Request) -> None:
        """Queues a request; it joins the batch at the next step with a free row."""
        self._waiting.put(request)
        self._wake.set()

    def waiting(self) -> int:
        """Requests submitted and not yet decoding (an estimate from another thread)."""
        return self._waiting.qsize() + len(self._deferred)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Runs fn in the engine's thread between two steps (adapter loading, say)."""
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def start(self) -> None:
        """Runs the loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="minilora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the engine's loop and waits for its thread (up to 30 s)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ the engine's thread

    def run(self) -> None:
        """The loop: between steps, run calls and admit requests; idle when nothing runs."""
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug outside any request: log it, keep serving the others
                log.exception("minilora serve: the engine's step failed")
                busy = False
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    @torch.inference_mode()
    def step(self) -> bool:
        """One round: calls, cancellations, new requests, one decode step for every row.

        Returns:
            False when there was nothing to do.
        """
        busy = self._run_calls()
        self._drop_cancelled()
        joining: list[Request] = []
        deferred, self._deferred = self._deferred, []
        for request in deferred:  # the oldest first
            if request.cancelled:
                continue
            if len(self.rows) + len(joining) < self.max_batch:
                joining.append(request)
            else:
                self._deferred.append(request)
        while len(self.rows) + len(joining) < self.max_batch and not self._waiting.empty():
            request = self._waiting.get()
            if not request.cancelled:
                joining.append(request)
        if self.prefill_chunk is not None:
            if joining or self.rows:
                self._guard(self._mixed_step, joining)
                busy = True
            self._unload_unused()
            return busy
        if joining:
            self._guard(self._admit, joining)
            busy = True
        if self.rows:
            self._guard(lambda _: self._decode(), [])
            busy = True
        self._unload_unused()
        return busy

    def unload(self, adapter: str) -> None:
        """Deletes an adapter from the model once no running request uses it (call it in the
        engine's thread, through `call`); requests that still name it fail at admission."""
        self._unloading.add(adapter)
        self._unload_unused()

    def add_adapter(self, name: str, load: Callable[[], Any]) -> None:
        """Runs load() (which puts adapter `name` into the model) and makes it evictable; past
        max_loras, the least recently used idle adapters are evicted (the new one too, when
        every other is busy: it is reloaded when a request names it). Call it in the engine's
        thread, through `call`."""
        load()
        self._evictable[name] = None
        self._evictable.move_to_end(name)
        self._evict(room=0, keep=set())

    def resident(self) -> list[str]:
        """The adapters in the model now."""
        return list_adapters(self.model)

    def _evict(self, room: int, keep: set[str | None]) -> bool:
        """Evicts idle run-time adapters, least recently used first, until `room` more fit
        under max_loras; returns False when not enough of them are idle."""
        if self.max_loras is None:
            return True
        resident = list_adapters(self.model)
        busy = keep | {r.request.adapter for r in self.rows}
        excess = len(resident) + room - self.max_loras
        for name in list(self._evictable):
            if excess <= 0:
                break
            if name in busy or name not in resident:
                continue
            delete_adapter(self.model, name)
            del self._evictable[name]
            excess -= 1
        if list_adapters(self.model):
            set_active(self.model, [])
        return excess <= 0

    def is_unloading(self, adapter: str) -> bool:
        """True while an unloaded adapter still serves the requests that began with it."""
        return adapter in self._unloading

    def _unload_unused(self) -> None:
        for name in list(self._unloading):
            if not any(r.request.adapter == name for r in self.rows):
                self._unloading.discard(name)
                self._evictable.pop(name, None)
                if name in list_adapters(self.model):
                    delete_adapter(self.model, name)
                    if list_adapters(self.model):
                        set_active(self.model, [])

    def _run_calls(self) -> bool:
        ran = False
        while not self._calls.empty():
            fn, future = self._calls.get()
            ran = True
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the caller's future carries it, whatever it is
                    future.set_exception(e)
        return ran

    def _guard(self, fn: Callable[[list[Request]], None], joining: list[Request]) -> None:
        """Runs admission or a decode step; if it raises, the requests it touched end with that
        error and the loop goes on (a broken request must not take the server down)."""
        rows = len(self.rows)
        try:
            fn(joining)
        except Exception as e:  # reported to every affected client, never swallowed
            failed = list(joining)
            if not joining or len(self.rows) != rows:  # the batch itself may be inconsistent
                failed += [r.request for r in self.rows if r.request not in failed]
                self.rows.clear()
                self.cache.length = 0
            for request in failed:
                _send(request, Event(error=e))

    def _drop_cancelled(self) -> None:
        for i in range(len(self.rows) - 1, -1, -1):
            if self.rows[i].request.cancelled:
                self._remove(i)

    def _remove(self, i: int) -> None:
        last = len(self.rows) - 1
        if i != last:
            self.cache.move(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.cache.length = 0  # an empty batch starts its timeline over

    def _routed(self, adapters: list[str | None]) -> AbstractContextManager[Any]:
        """Row i of the forwards inside takes adapters[i] (minilora.lora.named.mixed_adapters).
        The engine is its model's only writer of adapter weights, and writes them through
        minilora's loaders only, so the layers' stacked adapters are not re-checked each call.
        The base's rows need no routing; a model without any adapter would refuse it."""
        if not any(a is not None for a in adapters):
            return nullcontext()
        return mixed_adapters(self.model, adapters, check_stacks=False)

    def _admit(self, joining: list[Request]) -> None:
        """Prefills the new prompts in one batch, moves their caches into free rows, picks their
        first tokens. Prompts are left-padded, so every row's last token is the last column;
        position_ids start each prompt at 0, as `generate` does."""
        joining[:] = self._with_adapters(joining)
        if not joining:
            return
        B, L = len(joining), max(len(r.prompt_ids) for r in joining)
        ids = torch.zeros(B, L, dtype=torch.long, device=self.device)  # (B, L)
        mask = torch.zeros(B, L, dtype=torch.bool, device=self.device)  # (B, L)
        for i, r in enumerate(joining):
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, L - len(r.prompt_ids):] = True
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L), 0 at each prompt's start
        prefill = KVCache(self.model.config, B, L, device=self.device,
                          dtype=self.cache.keys[0].dtype)
        with self._routed([r.adapter for r in joining]):
            logits = self.model(ids, attention_mask=mask, past_key_values=prefill,
                                position_ids=positions, logits_to_keep=1).logits[:, -1]  # (B, V)
        first = len(self.rows)
        for i, request in enumerate(joining):
            self.cache.place(first + i, prefill, i, mask[i])
            self.rows.append(_Running(request, self.tokenizer, self.device))
        self._take_all(self.rows[first:], logits, first)

    def _with_adapters(self, joining: list[Request]) -> list[Request]:
        """The requests whose adapter is in the model, reloading evicted ones where there is
        room; the others wait (no room yet) or fail alone (unknown, or unloaded meanwhile)."""
        known = set(list_adapters(self.model))
        ready: list[Request] = []
        for request in joining:
            name = request.adapter
            if name is None or name in known:
                ready.append(request)
                if name is not None and name in self._evictable:
                    self._evictable.move_to_end(name)
                continue
            if self.reload is None or name in self._unloading:
                _send(request, Event(error=ConfigError(
                    f"adapter {name!r} is not loaded (loaded: {sorted(known)})")))
                continue
            room = self._evict(room=1, keep={r.adapter for r in ready})
            known = set(list_adapters(self.model))  # what eviction left
            if not room:
                self._deferred.append(request)  # every slot is busy: it waits for one
                continue
            try:
                self.reload(name)
            except Exception as e:  # unknown now, or its files changed: it fails alone
                _send(request, Event(error=e))
                continue
            known.add(name)
            self._evictable[name] = None
            ready.append(request)
        return ready

    def _mixed_step(self, joining: list[Request]) -> None:
        """Chunked prefill: one forward feeds every decoding row its token and every row still
        reading its prompt the next prefill_chunk tokens of it. Rows are left-padded to the
        longest feed, so each row's newest token is the last column; the padding's slots are
        not the row's own (masked), and position_ids give each token its true position."""
        joined = self._with_adapters(joining)
        for request in joined:  # a joining row starts with an empty timeline of its own
            self.cache.clear(len(self.rows))
            running = _Running(request, self.tokenizer, self.device)
            running.fed = 0
            self.rows.append(running)
        if not self.rows:
            return
        assert self.prefill_chunk is not None  # this step is chunked prefill's
        feeds: list[list[int]] = []
        starts: list[int] = []  # the first fed token's position
        for r in self.rows:
            prompt = r.request.prompt_ids
            if r.fed < len(prompt):
                feeds.append(prompt[r.fed:r.fed + self.prefill_chunk])
                starts.append(r.fed)
            else:
                feeds.append([r.token])
                starts.append(r.position - 1)
        n, T = len(self.rows), max(len(f) for f in feeds)
        self.cache.make_room(n, T)
        start = self.cache.length
        ids, mask = left_padded(feeds)  # (n, T) each
        real = mask.bool()  # (n, T)
        positions = torch.zeros(n, T, dtype=torch.long)  # (n, T)
        for i, (feed, first) in enumerate(zip(feeds, starts, strict=True)):
            positions[i, T - len(feed):] = torch.arange(first, first + len(feed))
        self.cache.owned[:n, start:start + T] = real.to(self.device)
        with self._routed([r.request.adapter for r in self.rows]):
            out = self.model(ids.to(self.device),
                             attention_mask=self.cache.owned[:n, :start + T],
                             past_key_values=self.cache, position_ids=positions.to(self.device),
                             logits_to_keep=1)
        answering = []
        for i, r in enumerate(self.rows):
            if r.fed < len(r.request.prompt_ids):
                r.fed += len(feeds[i])
                if r.fed < len(r.request.prompt_ids):
                    continue  # still reading its prompt: no token yet
            answering.append(i)
        self._take_rows(answering, out.logits[answering, -1])

    def _decode(self) -> None:
        """One token for every running row."""
        n = len(self.rows)
        self.cache.make_room(n)
        slot = self.cache.length
        self.cache.owned[:n, slot] = True
        tokens = torch.tensor([[r.token] for r in self.rows], device=self.device)  # (n, 1)
        positions = torch.tensor([[r.position - 1] for r in self.rows],
                                 device=self.device)  # (n, 1): the fed token's own position
        with self._routed([r.request.adapter for r in self.rows]):
            out = self.model(tokens, attention_mask=self.cache.owned[:n, : slot + 1],
                             past_key_values=self.cache, position_ids=positions,
                             logits_to_keep=1)
        self._take_all(list(self.rows), out.logits[:, -1], 0)

    def _take_all(self, rows: list[_Running], logits: Tensor, first: int) -> None:
        """The next token of each of rows (rows first.. of the batch), from logits (n, V);
        the greedy ones in one argmax. Finished rows leave."""
        self._take_rows(list(range(first, first + len(rows))), logits)

    def _take_rows(self, indices: list[int], logits: Tensor) -> None:
        """The next token of each row of the batch in indices (ascending), from logits
        (len(indices), V); the greedy ones in one argmax. Finished rows leave."""
        if not indices:
            return
        rows = [self.rows[i] for i in indices]
        greedy = logits.argmax(dim=-1).tolist()  # (n,)
        tokens = []
        for i, running in enumerate(rows):
            params = running.request.params
            if params.temperature == 0:
                tokens.append(greedy[i])
            else:
                tokens.append(int(pick_token(logits[i], temperature=params.temperature,
                                             top_p=params.top_p, top_k=params.top_k,
                                             min_p=params.min_p, generator=running.generator)))
        self._logprobs(rows, logits, tokens)
        finished = []
        for i, running in enumerate(rows):
            if self._take(running, tokens[i]):
                finished.append(indices[i])
        for i in reversed(finished):
            self._remove(i)

    def _logprobs(self, rows: list[_Running], logits: Tensor, tokens: list[int]) -> None:
        """Adds each chosen token's log-probability (and the likeliest ones') to the rows that
        asked for them; an end-of-turn token is not part of the answer and is left out (unless
        the request ignores it)."""
        want = [i for i, r in enumerate(rows) if r.request.params.logprobs is not None
                and (tokens[i] not in self.eos or r.request.params.ignore_eos)]
        if not want:
            return
        logp = torch.log_softmax(logits[want].float(), dim=-1)  # (w, V)
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in want],
                                             device=logp.device)).squeeze(1).tolist()  # (w,)
        k = max(rows[i].request.params.logprobs or 0 for i in want)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0])
        top_lists: list[list[float]] = top_values.tolist()  # (w, k)
        id_lists: list[list[int]] = top_ids.long().tolist()
        for j, i in enumerate(want):
            own = rows[i].request.params.logprobs or 0
            rows[i].logprobs.append(TokenLogprob(
                tokens[i], chosen[j], list(zip(id_lists[j][:own], top_lists[j][:own],
                                               strict=True))))

    def _take(self, running: _Running, token: int) -> bool:
        """Adds one row's next token and tells its client; returns True when it is done."""
        request = running.request
        reason: str | None
        if token in self.eos and not request.params.ignore_eos:
            # sends whatever was held back for a stop string that never came
            piece, reason = self.tokenizer.decode(running.generated)[running.shown:], FINISH_STOP
        else:
            piece, reason = running.add(token)
            if reason is None and running.position >= self.context:
                piece += self.tokenizer.decode(running.generated)[running.shown:]
                reason = FINISH_LENGTH
        if piece:
            _send(request, Event(text=piece, logprobs=running.logprobs))
            running.logprobs = []
        if reason is not None:
            _send(request, Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                                 completion_tokens=len(running.generated),
                                 logprobs=running.logprobs))
            running.logprobs = []
        return reason is not None


def _send(request: Request, event: Event) -> None:
    try:
        request.on_event(event)
    except Exception:  # a client whose loop is gone: its request is over either way
        request.cancel()
