"""The engine: one worker thread owns the model and every sequence; callers submit requests.

    submit() → waiting (bounded) → running (≤ max_running) → finished → pool (LRU, prefix reuse)

Each scheduler iteration advances every running request by one `generate` step (the prefill on
its first step). Today the model runs one sequence per forward call, so several running
requests interleave token by token; a batched forward replaces `_step_running` alone. Steps go
back to each caller through its own thread-safe channel, usable from threads (`get`, iteration)
and from asyncio (`aget`).
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

from hybrid_runtime.engine.generate import Sequence, Step, common_prefix, generate
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.errors import HybridError, InvalidRequestError


class QueueFullError(HybridError):
    """Too many requests are waiting; try again later (HTTP 503)."""


class EngineClosedError(HybridError):
    """The engine was shut down."""


_END = object()  # put after an error so iteration stops


@dataclass(slots=True)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[object], None]  # receives Steps, then possibly an exception
    constraint: object = None  # a generate.Constraint (grammar matcher) for this request, or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class Running:
    request: Request
    seq: Sequence
    steps: Iterator[Step]


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
            self._free.pop(0)


class Engine:
    """Owns a loaded model on one worker thread. Thread-safe `submit`; `close` when done."""

    def __init__(self, model, max_queue: int = 16, max_running: int = 1, pool_size: int = 2):
        if max_queue < 0 or max_running < 1 or pool_size < 0:
            raise InvalidRequestError("max_queue and pool_size must be >= 0 and max_running >= 1")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_queue, self.max_running = max_queue, max_running
        self.pool = SequencePool(model.new_cache, pool_size)
        self._waiting: deque[Request] = deque()
        self._running: list[Running] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hybrid-engine", daemon=True)
        self._thread.start()

    # -- callers' side ----------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def submit(self, prompt: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None, constraint=None) -> RequestHandle:
        """Queue a request; raises QueueFullError when `max_queue` requests already wait.
        `constraint`: a fresh generate.Constraint owned by this request (structured output)."""
        params.validate()
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        handle = RequestHandle(self, loop)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            busy = len(self._running) >= self.max_running
            if busy and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the server is busy ({len(self._waiting)} requests waiting); try again later")
            handle.request = Request(next(self._ids), list(prompt), params, handle._put, constraint)
            self._waiting.append(handle.request)
            self._cond.notify()
        return handle

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
            self._step_running()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_running and not self._closed:
            req = self._waiting.popleft()
            seq = self.pool.acquire(req.prompt)
            steps = generate(self.model, self.tokenizer, req.prompt, req.params, seq, req.cancelled.is_set,
                             req.constraint)
            self._running.append(Running(req, seq, steps))

    def _step_running(self) -> None:
        """One scheduler iteration: every running request advances by one step."""
        for run in list(self._running):
            finished, reusable = self._advance(run)
            if finished:
                run.steps.close()
                with self._cond:
                    self._running.remove(run)
                    if reusable:
                        self.pool.release(run.seq)

    def _advance(self, run: Running) -> tuple[bool, bool]:
        """(finished, sequence reusable)."""
        try:
            step = next(run.steps)
        except StopIteration:
            return True, True
        except HybridError as e:
            run.request.sink(e)
            return True, False
        except Exception as e:  # a bug: report it to the caller, keep serving others
            run.request.sink(e)
            return True, False
        run.request.sink(step)
        return step.finish_reason is not None, True
