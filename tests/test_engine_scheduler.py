"""Engine: queueing, cancellation, prefix reuse through the pool, errors; a fake model keeps it fast."""

import asyncio
import threading
import time

import numpy as np
import pytest

from hybrid_runtime.engine.generate import Sequence
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.engine.scheduler import Engine, QueueFullError, SequencePool
from hybrid_runtime.errors import InvalidRequestError

V = 32  # vocab


class FakeCache:
    def __init__(self):
        self.n_tokens = 0

    def truncate(self, n):
        self.n_tokens = min(n, self.n_tokens)


class FakeTokenizer:
    eog_ids = frozenset({0})

    def token_bytes(self, t):
        return bytes([97 + t % 26])


class FakeModel:
    """Logits favour (last token + 1); `gate` lets a test hold the worker inside forward."""

    n_ctx = 64

    def __init__(self, delay=0.0):
        self.tokenizer = FakeTokenizer()
        self.delay = delay
        self.forwarded = []  # token counts of each forward call
        self.caches = 0

    def new_cache(self):
        self.caches += 1
        return FakeCache()

    def forward(self, ids, cache, all_logits=False):
        time.sleep(self.delay)
        self.forwarded.append(len(ids))
        cache.n_tokens += len(ids)
        logits = np.zeros((1, V), np.float32)
        logits[0, (ids[-1] % (V - 1)) + 1] = 10.0
        return logits


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n)


def collect(handle, limit=5.0):
    steps, t0 = [], time.monotonic()
    while not handle.done and time.monotonic() - t0 < limit:
        s = handle.get(timeout=0.1)
        if s is not None:
            steps.append(s)
    assert handle.done, "request did not finish in time"
    return steps


def wait_running(e, limit=5.0):
    deadline = time.monotonic() + limit
    while e.running_count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.running_count == 1


@pytest.fixture
def engine_factory():
    engines = []

    def make(model, **kw):
        e = Engine(model, **kw)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def test_one_request_streams_and_finishes(engine_factory):
    e = engine_factory(FakeModel())
    steps = collect(e.submit([1, 2, 3], greedy(4)))
    assert "".join(s.text for s in steps) == "efgh"  # tokens 4, 5, 6, 7
    assert steps[-1].finish_reason == "length"
    assert steps[-1].stats.prompt_tokens == 3


def test_prefix_reuse_across_requests(engine_factory):
    m = FakeModel()
    e = engine_factory(m, pool_size=2)
    collect(e.submit(list(range(1, 21)), greedy(2)))
    m.forwarded.clear()
    last = collect(e.submit(list(range(1, 21)) + [9, 9], greedy(1)))[-1]
    assert last.stats.cached_tokens == 20
    assert m.forwarded[0] == 2  # only the new tokens were prefilled
    assert m.caches == 1


def test_pool_picks_longest_common_prefix():
    pool = SequencePool(lambda: FakeCache(), capacity=3)
    for toks in ([1, 2, 3], [5, 6, 7, 8], [1, 2, 9]):
        pool.release(Sequence(FakeCache(), toks))
    assert pool.acquire([5, 6, 7, 1]).tokens == [5, 6, 7, 8]
    assert pool.acquire([1, 2, 9, 9]).tokens == [1, 2, 9]
    pool.release(Sequence(FakeCache(), [4]))
    pool.release(Sequence(FakeCache(), [3]))
    pool.release(Sequence(FakeCache(), [2]))
    assert len(pool) == 3  # the oldest was evicted


def test_queue_full_raises(engine_factory):
    e = engine_factory(FakeModel(delay=0.02), max_queue=1)
    running = e.submit([1], greedy(1000))
    wait_running(e)
    waiting = e.submit([2], greedy(5))
    with pytest.raises(QueueFullError):
        e.submit([3], greedy(5))
    running.cancel()
    assert collect(running)[-1].finish_reason == "cancelled"
    assert collect(waiting)[-1].finish_reason == "length"


def test_cancel_while_waiting(engine_factory):
    e = engine_factory(FakeModel(delay=0.02), max_queue=4)
    first = e.submit([1], greedy(1000))
    wait_running(e)
    second = e.submit([2], greedy(5))
    second.cancel()
    assert e.queue_length == 0
    assert collect(second)[-1].finish_reason == "cancelled"
    first.cancel()
    collect(first)


def test_bad_params_rejected_at_submit(engine_factory):
    e = engine_factory(FakeModel())
    with pytest.raises(InvalidRequestError):
        e.submit([1], SamplingParams(top_p=2.0))
    with pytest.raises(InvalidRequestError):
        e.submit([], greedy(1))


def test_generation_error_reaches_caller_and_engine_survives(engine_factory):
    e = engine_factory(FakeModel())
    with pytest.raises(InvalidRequestError):  # prompt longer than the context
        collect(e.submit(list(range(1, 30)) * 3, greedy(1)))
    assert collect(e.submit([1], greedy(2)))[-1].finish_reason == "length"


def test_async_consumer(engine_factory):
    e = engine_factory(FakeModel())

    async def run():
        h = e.submit([1, 2], greedy(3), loop=asyncio.get_running_loop())
        out = []
        for _ in range(100):
            s = await h.aget(timeout=1.0)
            if s is not None:
                out.append(s)
            if h.done:
                break
        return out

    steps = asyncio.run(run())
    assert steps[-1].finish_reason == "length"
    assert "".join(s.text for s in steps) == "def"


def test_concurrent_submitters(engine_factory):
    e = engine_factory(FakeModel(), max_queue=16, max_running=2)
    results = {}

    def worker(i):
        results[i] = "".join(s.text for s in collect(e.submit([i + 1], greedy(3))))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: "".join(chr(97 + (i + 1 + k)) for k in range(1, 4)) for i in range(6)}


def test_real_tiny_model(tmp_path_factory):
    from hybrid_runtime.api import load
    from hybrid_runtime.synth import cached_model

    path, _ = cached_model("kimi-k2-tiny", "Q4_K_M", tmp_path_factory.getbasetemp() / "models")
    m = load(path, n_ctx=128, threads=1)
    e = Engine(m)
    try:
        prompt = m.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        a = collect(e.submit(prompt, SamplingParams(seed=5, max_tokens=8)), limit=30)
        b = collect(e.submit(prompt, SamplingParams(seed=5, max_tokens=8)), limit=30)
        assert "".join(s.text for s in a) == "".join(s.text for s in b)
        assert b[-1].stats.cached_tokens == len(prompt) - 1
    finally:
        e.close()


class BatchingFakeModel(FakeModel):
    """FakeModel with a forward_batch that records the batch sizes."""

    def __init__(self, delay=0.0):
        super().__init__(delay)
        self.batches = []

    def forward_batch(self, ids, caches):
        time.sleep(self.delay)
        self.batches.append(len(ids))
        rows = [FakeModel.forward(self, [t], c)[0] for t, c in zip(ids, caches)]
        self.forwarded[-len(ids):] = []
        return np.stack(rows)


def test_running_requests_decode_in_one_batched_step(engine_factory):
    m = BatchingFakeModel(delay=0.005)
    e = engine_factory(m, max_running=4)
    handles = [e.submit([i + 1, i + 2], greedy(12)) for i in range(4)]
    outs = [collect(h) for h in handles]
    assert max(m.batches) == 4  # all four decoded together once their prompts were in
    for i, steps in enumerate(outs):  # each sequence's own continuation: (last + 1) mod 31
        expect = [((i + 2 + k) % (V - 1)) + 1 for k in range(12)]
        assert [s.token for s in steps if s.token is not None] == expect


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine_factory):
    m = BatchingFakeModel(delay=0.002)
    e = engine_factory(m, max_running=2, prefill_chunk=8)
    first = e.submit([1], greedy(40))
    wait_running(e)
    while not m.batches and not first.done:  # the first request is decoding
        time.sleep(0.005)
    before = len(m.batches)
    m.forwarded.clear()
    second = collect(e.submit(list(range(1, 41)), greedy(2)))
    assert m.forwarded[:5] == [8, 8, 8, 8, 8]  # 40 prompt tokens in five chunks
    assert len(m.batches) - before >= 5  # ... with decode steps of the first request between them
    assert second[-1].finish_reason == "length"
    collect(first)


def test_cache_budget_admits_what_fits_and_rejects_what_never_can(engine_factory):
    from hybrid_runtime.engine.scheduler import CacheBudgetError

    m = BatchingFakeModel(delay=0.002)
    e = engine_factory(m, max_running=8, cache_tokens=30)
    a = e.submit([1, 2], greedy(18))  # reserves 20 tokens
    b = e.submit([3, 4], greedy(18))  # 20 more would pass 30: waits for a
    seen = 0
    while not a.done:
        seen = max(seen, e.running_count)
        a.get(timeout=0.05)
    assert seen == 1
    assert collect(b)[-1].finish_reason == "length"
    with pytest.raises(CacheBudgetError, match="budget is 30"):
        e.submit([1, 2], greedy(40))
    assert e.stats().reserved_tokens == 0


def test_cancelled_sequence_leaves_the_batch(engine_factory):
    m = BatchingFakeModel(delay=0.01)
    e = engine_factory(m, max_running=4)
    keep = e.submit([1], greedy(30))
    drop = e.submit([2], greedy(1000))
    while not m.batches or m.batches[-1] < 2:
        time.sleep(0.005)
    drop.cancel()
    steps = collect(drop)
    assert steps[-1].finish_reason == "cancelled"
    collect(keep)
    assert m.batches[-1] == 1  # the rest of keep's steps ran alone
