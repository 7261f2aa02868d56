"""The engine: one worker thread owns the model and every sequence; callers submit requests.

    submit() → waiting (bounded, FIFO) → running (≤ max_running, within the cache budget)
             → finished → pool (LRU, prefix reuse)

Continuous batching: every iteration admits what fits, gives one prompt chunk to the oldest
request still prefilling (a long new prompt advances chunk by chunk, so the streams already
running keep their pace), and runs one batched decode step for every running sequence
(`Model.forward_batch`: each weight, and each expert chosen by several of the tokens, is read
once for the whole batch). The same `Decoding` state machine as the lone `generate` loop samples
and stops each sequence. A new sequence starts from the longest cached prefix it shares with a
pooled or running sequence (swarm agents with one system prompt): its blocks are shared,
reference counted, copied on write (cpu/cache.py).

Batch invariance: a sequence's logits are the same bits alone and batched (the compiled step's
per-token arithmetic does not depend on the batch; prompts are never mixed). With
`exact_reuse`, a reused prefix is limited to what gives the same bits as computing it anew
(`Model.exact_reuse_unit`), so a request's output depends on nothing else the server runs.
Steps go back to each caller through its own thread-safe channel, usable from threads (`get`,
iteration) and from asyncio (`aget`).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from hybrid_runtime.engine.generate import Decoding, Sequence, Step, common_prefix
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.errors import HybridError, InvalidRequestError


class QueueFullError(HybridError):
    """Too many requests are waiting; try again later (HTTP 503)."""


class CacheBudgetError(InvalidRequestError):
    """The request alone needs more latent cache than the engine's whole budget (HTTP 400)."""


class EngineClosedError(HybridError):
    """The engine was shut down."""


_END = object()  # put after an error so iteration stops
_RATE_WINDOW_S = 10.0  # aggregate tokens/s over this window


@dataclass(slots=True)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[object], None]  # receives Steps, then possibly an exception
    constraint: object = None  # a generate.Constraint (grammar matcher) for this request, or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    need: int = 0  # latent-cache tokens reserved while it runs


@dataclass(slots=True)
class Running:
    request: Request
    seq: Sequence
    dec: Decoding


@dataclass(slots=True)
class EngineStats:
    """What /metrics shows of the engine."""
    running: int
    waiting: int
    batch_size: int  # sequences in the last decode step
    tokens_per_s: float  # tokens generated per second, all sequences, over the last 10 s
    reserved_tokens: int
    budget_tokens: int
    cache_blocks_in_use: int | None  # paged latent cache blocks (shared blocks once)
    cache_blocks: int | None
    steps: int  # decode steps so far
    step_tokens: int  # tokens those steps decoded
    step_seconds: float
    expert_reads: int | None  # routed experts read so far (each once per step for all its tokens)
    expert_bytes: int | None
    shared_tokens: int  # prompt tokens that started from another sequence's blocks


class RequestHandle:
    """One submitted request: its Steps (the last carries finish_reason and stats) and cancel()."""

    def __init__(self, engine: "Engine", loop: asyncio.AbstractEventLoop | None):
        self._engine = engine
        self._loop = loop
        self._sync: queue.Queue = queue.Queue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.done = False
        self.request: Request | None = None

    def _put(self, item: object) -> None:  # called from the worker thread
        if self._loop is None:
            self._sync.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody listens any more
            self.cancel()

    def cancel(self) -> None:
        """Stop generating (client gone, Ctrl-C); the sequence goes back to the pool."""
        if self.request is not None:
            self._engine._cancel(self.request)

    def _unwrap(self, item: object) -> Step:
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item is _END:
            self.done = True
            raise EngineClosedError("the engine stopped before the request finished")
        if item.finish_reason is not None:
            self.done = True
        return item

    def get(self, timeout: float | None = None) -> Step | None:
        """The next Step, or None after `timeout` seconds; raises the request's error."""
        try:
            return self._unwrap(self._sync.get(timeout=timeout))
        except queue.Empty:
            return None

    async def aget(self, timeout: float | None = None) -> Step | None:
        """Async `get` (the handle must have been submitted with a loop)."""
        try:
            return self._unwrap(await asyncio.wait_for(self._async.get(), timeout))
        except asyncio.TimeoutError:
            return None

    def __iter__(self) -> Iterator[Step]:
        while not self.done:
            step = self.get(timeout=0.1)
            if step is not None:
                yield step


class SequencePool:
    """Finished sequences kept for prefix reuse, least recently used first."""

    def __init__(self, new_cache: Callable[[], object], capacity: int):
        self._new_cache = new_cache
        self.capacity = capacity
        self._free: list[Sequence] = []

    def __len__(self) -> int:
        return len(self._free)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(list(self._free))

    def acquire(self, prompt: list[int]) -> Sequence:
        """The pooled sequence sharing the longest prefix with `prompt` (else the oldest, else new)."""
        if not self._free:
            return Sequence(self._new_cache())
        best = max(range(len(self._free)), key=lambda i: (common_prefix(self._free[i].tokens, prompt), i))
        if common_prefix(self._free[best].tokens, prompt) == 0:
            best = 0  # no overlap anywhere: recycle the least recently used cache
        return self._free.pop(best)

    def release(self, seq: Sequence) -> None:
        self._free.append(seq)
        while len(self._free) > self.capacity:
            _drop(self._free.pop(0))


def _drop(seq: Sequence) -> None:
    """Give a sequence's cache blocks back now (a paged cache; others just go away)."""
    release = getattr(seq.cache, "release", None)
    if release is not None:
        release()


class Engine:
    """Owns a loaded model on one worker thread. Thread-safe `submit`; `close` when done.

    max_running: sequences decoded together (the batch); cache_tokens: the latent-cache tokens
    the running requests may reserve together (each reserves its prompt plus max_tokens, at
    most the context; None: max_running full contexts); a request waits until both allow it,
    in arrival order. prefill_chunk: prompt tokens per iteration (default: the model's chunk)."""

    def __init__(self, model, max_queue: int = 16, max_running: int = 1, pool_size: int = 2,
                 cache_tokens: int | None = None, prefill_chunk: int | None = None, exact_reuse: bool = False):
        if max_queue < 0 or max_running < 1 or pool_size < 0:
            raise InvalidRequestError("max_queue and pool_size must be >= 0 and max_running >= 1")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_queue, self.max_running = max_queue, max_running
        self.cache_tokens = cache_tokens if cache_tokens is not None else max_running * model.n_ctx
        if self.cache_tokens < 1:
            raise InvalidRequestError("the cache budget must be at least one token")
        options = getattr(model, "options", None)
        self.prefill_chunk = prefill_chunk or getattr(options, "prefill_chunk", 512)
        self.exact_reuse = exact_reuse
        self.reuse_unit = getattr(model, "exact_reuse_unit", 1) if exact_reuse else 1
        if self.reuse_unit > 1:  # exact reuse: prompts go in the model's own aligned chunks
            self.prefill_chunk = self.reuse_unit
        self._batch = getattr(model, "forward_batch", None)
        # prompt chunks shorter than this join the decode step (their weight reads shared)
        self._mix_limit = getattr(model, "prompt_mix_limit", 0) if hasattr(model, "forward_segments") else 0
        # prompt tokens per mixed step: an eighth of a chunk, so a burst of new requests does not
        # stall the running streams for a whole chunk's compute (16 prompts of 32 in one step: 3 s
        # on the 2-vCPU dev box; 16 clients 1.58x one stream that way, 1.86x with this budget)
        self.mix_tokens = max(1, self.prefill_chunk // 8)
        self.pool = SequencePool(model.new_cache, pool_size)
        self._waiting: deque[Request] = deque()
        self._running: list[Running] = []
        self._reserved = 0
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._rate: deque[tuple[float, int]] = deque()
        self._batch_size = 0
        self._steps = self._step_tokens = self._shared = 0
        self._step_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="hybrid-engine", daemon=True)
        self._thread.start()

    # -- callers' side ----------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def stats(self) -> EngineStats:
        now = time.perf_counter()
        with self._cond:
            while self._rate and self._rate[0][0] < now - _RATE_WINDOW_S:
                self._rate.popleft()
            span = min(_RATE_WINDOW_S, now - self._rate[0][0]) if self._rate else 0.0
            rate = sum(n for _, n in self._rate) / span if span > 0.5 else 0.0
            pool = getattr(self._any_cache(), "pool", None)
            reads = self.model.expert_reads() if hasattr(self.model, "expert_reads") else None
            return EngineStats(
                running=len(self._running), waiting=len(self._waiting), batch_size=self._batch_size,
                tokens_per_s=rate, reserved_tokens=self._reserved, budget_tokens=self.cache_tokens,
                cache_blocks_in_use=getattr(pool, "blocks_in_use", None), cache_blocks=getattr(pool, "n_blocks", None),
                steps=self._steps, step_tokens=self._step_tokens, step_seconds=self._step_s,
                expert_reads=None if reads is None else reads[0], expert_bytes=None if reads is None else reads[1],
                shared_tokens=self._shared)

    def _any_cache(self):
        for run in self._running:
            return run.seq.cache
        for seq in self.pool:
            return seq.cache
        return None

    def need_tokens(self, prompt: list[int], params: SamplingParams) -> int:
        """Latent-cache tokens a request reserves while it runs."""
        return min(len(prompt) + params.max_tokens, self.model.n_ctx)

    def submit(self, prompt: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None, constraint=None) -> RequestHandle:
        """Queue a request; raises QueueFullError when `max_queue` requests already wait and
        CacheBudgetError when it could never fit the cache budget.
        `constraint`: a fresh generate.Constraint owned by this request (structured output)."""
        params.validate()
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        need = self.need_tokens(prompt, params)
        if need > self.cache_tokens:
            raise CacheBudgetError(f"the request needs {need} tokens of latent cache (prompt + max_tokens); "
                                   f"the server's budget is {self.cache_tokens}: lower max_tokens")
        handle = RequestHandle(self, loop)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            busy = bool(self._waiting) or not self._fits(need)
            if busy and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the server is busy ({len(self._running)} running, {len(self._waiting)} "
                                     "waiting); try again later")
            handle.request = Request(next(self._ids), list(prompt), params, handle._put, constraint, need=need)
            self._waiting.append(handle.request)
            self._cond.notify()
        return handle

    def _fits(self, need: int) -> bool:
        return len(self._running) < self.max_running and self._reserved + need <= self.cache_tokens

    def _cancel(self, req: Request) -> None:
        with self._cond:
            req.cancelled.set()
            if req in self._waiting:
                self._waiting.remove(req)
                req.sink(Step("", None, finish_reason="cancelled"))
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker; unfinished requests end with EngineClosedError."""
        with self._cond:
            self._closed = True
            for req in self._waiting:
                req.sink(_END)
            self._waiting.clear()
            for run in self._running:
                run.request.cancelled.set()
            self._cond.notify()
        self._thread.join(timeout)

    # -- worker side ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed and not self._running:
                    return
                self._admit()
            self._iteration()

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0].need) and not self._closed:
            req = self._waiting.popleft()
            try:
                dec = Decoding(self.model, self.tokenizer, req.prompt, req.params, Sequence(None),
                               req.cancelled.is_set, req.constraint)
            except Exception as e:  # noqa: BLE001 - reported to its caller
                req.sink(e)
                continue
            self._reserved += req.need
            self._running.append(Running(req, dec.seq, dec))

    def _iteration(self) -> None:
        """Cancellations, then one step: the decode tokens of every running sequence together with
        the short prompt chunks that fit beside them (one weight read for all), or else one prompt
        chunk and one batched decode step."""
        for run in list(self._running):
            if run.request.cancelled.is_set():
                self._emit(run, run.dec.cancel())
        decoding = [r for r in self._running if r.dec.next_token is not None]
        mixed = self._mixable(decoding)
        if mixed:
            self._guarded(mixed + decoding, lambda: self._mixed_step(mixed, decoding))
            return
        prefilling = next((r for r in self._running if not r.dec.done and r.dec.next_token is None), None)
        if prefilling is not None:
            self._guarded([prefilling], lambda: self._prefill_chunk(prefilling))
        decoding = [r for r in self._running if r.dec.next_token is not None]
        if decoding:
            self._guarded(decoding, lambda: self._decode(decoding))

    def _mixable(self, decoding: list[Running]) -> list[Running]:
        """The prefilling requests whose next prompt chunk is short enough to join this step, in
        arrival order, while the step's tokens stay within one prefill chunk."""
        if not self._mix_limit:
            return []
        budget = min(self.prefill_chunk - len(decoding), self.mix_tokens)
        picked = []
        for run in [r for r in self._running if not r.dec.done and r.dec.next_token is None]:
            try:
                if not run.dec.started:
                    self._start(run)
            except Exception as e:  # noqa: BLE001 - as _guarded: tell its caller, keep serving
                run.request.sink(e)
                self._finish(run, reusable=False)
                continue
            n = len(self._chunk(run))
            if n == 0:
                continue
            if n >= self._mix_limit or n > budget:
                break  # arrival order: a long chunk goes alone, first
            picked.append(run)
            budget -= n
        return picked

    def _chunk(self, run: Running) -> list[int]:
        done = len(run.seq.tokens)
        return run.dec.pending[: self.prefill_chunk - done % self.prefill_chunk]  # aligned to whole chunks

    def _mixed_step(self, prefilling: list[Running], decoding: list[Running]) -> None:
        chunks = [self._chunk(r) for r in prefilling]
        tokens = [r.dec.next_token for r in decoding]
        logits = self.model.forward_segments(chunks + [[t] for t in tokens],
                                             [r.seq.cache for r in prefilling + decoding])
        # not counted as a decode step: its time is mostly the prompt chunks' (stats: decode steps)
        for run, chunk, row in zip(prefilling, chunks, logits):
            self._chunk_done(run, chunk, len(run.seq.tokens), row)
        for run, token, row in zip(decoding, tokens, logits[len(prefilling):]):
            self._token_done(run, token, row)

    def _guarded(self, runs: list[Running], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - a bad request or a bug: tell its callers, keep serving
            for run in runs:
                if run in self._running:
                    run.request.sink(e)
                    self._finish(run, reusable=False)

    def _prefill_chunk(self, run: Running) -> None:
        if not run.dec.started:
            self._start(run)
        chunk, done = self._chunk(run), len(run.seq.tokens)
        logits = self.model.forward(chunk, run.seq.cache)
        self._chunk_done(run, chunk, done, logits[-1])

    def _chunk_done(self, run: Running, chunk: list[int], done: int, last_logits) -> None:
        """The prompt chunk went into the cache (done tokens were there before it)."""
        dec, seq = run.dec, run.seq
        dec.fed(chunk)
        if self.reuse_unit == 1 or (done == seq.exact and len(chunk) == self.prefill_chunk):
            seq.exact = len(seq.tokens)
        if not dec.pending:
            self._emit(run, dec.accept(last_logits))

    def _decode(self, runs: list[Running]) -> None:
        tokens = [r.dec.next_token for r in runs]
        t0 = time.perf_counter()
        if self._batch is not None:
            logits = self._batch(tokens, [r.seq.cache for r in runs])
        else:
            import numpy as np

            logits = np.concatenate([self.model.forward([t], r.seq.cache) for t, r in zip(tokens, runs)])
        self._count_step(len(runs), time.perf_counter() - t0)
        for run, token, row in zip(runs, tokens, logits):
            self._token_done(run, token, row)

    def _count_step(self, n_decoding: int, dt: float) -> None:
        with self._cond:
            self._batch_size, self._steps = n_decoding, self._steps + 1
            self._step_tokens += n_decoding
            self._step_s += dt

    def _token_done(self, run: Running, token: int, logits) -> None:
        run.dec.fed([token])
        if self.reuse_unit == 1 and run.seq.exact == len(run.seq.tokens) - 1:
            run.seq.exact += 1
        self._emit(run, run.dec.accept(logits))

    def _start(self, run: Running) -> None:
        """Give the request a cache: the pooled sequence sharing most of its prompt, or blocks
        shared with a running or pooled sequence when that one shares more."""
        prompt = run.request.prompt
        with self._cond:
            seq = self.pool.acquire(prompt)
        own = self._reusable(seq, prompt)
        best, donor = own, None
        if hasattr(seq.cache, "share_prefix"):
            for other in [r.seq for r in self._running if r is not run and r.dec.started] + list(self.pool):
                n = self._reusable(other, prompt)
                if n > best and getattr(other.cache, "pool", None) is seq.cache.pool:
                    best, donor = n, other
        if donor is not None:
            seq.cache.share_prefix(donor.cache, best)
            seq.tokens, seq.exact = donor.tokens[:best], best
            with self._cond:
                self._shared += best
        else:
            seq.cache.truncate(own)
            seq.tokens, seq.exact = seq.tokens[:own], min(seq.exact, own)
        run.seq = run.dec.seq = seq
        run.dec.begin(limit=best)

    def _reusable(self, seq: Sequence, prompt: list[int]) -> int:
        n = min(common_prefix(seq.tokens, prompt), len(prompt) - 1)
        if self.exact_reuse:
            n = min(n, seq.exact) // self.reuse_unit * self.reuse_unit
        return n

    def _emit(self, run: Running, steps: list[Step]) -> None:
        now = time.perf_counter()
        n = sum(1 for s in steps if s.token is not None)
        if n:
            with self._cond:
                self._rate.append((now, n))
        for step in steps:
            run.request.sink(step)
        if run.dec.done:
            self._finish(run, reusable=True)

    def _finish(self, run: Running, reusable: bool) -> None:
        with self._cond:
            if run not in self._running:
                return
            self._running.remove(run)
            self._reserved -= run.request.need
            if reusable and run.dec.started:
                self.pool.release(run.seq)
            elif run.seq.cache is not None:
                _drop(run.seq)
            self._cond.notify()
