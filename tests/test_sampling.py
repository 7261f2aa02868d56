"""Sampling filters against direct numpy computations; the streaming decoder; the generation loop."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_runtime.engine.detok import StreamDecoder
from hybrid_runtime.engine.generate import common_prefix
from hybrid_runtime.engine.sampling import SamplingParams, apply_penalties, filter_logits, make_sampler
from hybrid_runtime.errors import InvalidRequestError


def _probs(x):
    p = np.exp(x - x[np.isfinite(x)].max())
    p[~np.isfinite(x)] = 0
    return p / p.sum()


def test_top_k_keeps_exactly_the_k_largest():
    rng = np.random.default_rng()
    logits = rng.normal(size=100)
    k = int(rng.integers(1, 50))
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    assert set(np.flatnonzero(np.isfinite(x))) == set(np.argsort(-logits)[:k])


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng()
    logits = rng.normal(size=200) * 3
    p = float(rng.uniform(0.1, 0.95))
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_p=p))
    kept = np.flatnonzero(np.isfinite(x))
    probs = _probs(logits.astype(np.float64))
    order = np.argsort(-probs)
    need = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
    assert set(kept) == set(order[:need])


def test_min_p_drops_tokens_below_fraction_of_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    x = filter_logits(logits, SamplingParams(temperature=1.0, min_p=0.2))
    assert list(np.isfinite(x)) == [True, True, True, False]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    a = make_sampler(SamplingParams(temperature=1.0, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, seed=7))
    draws_a = [a(logits, []) for _ in range(3000)]
    assert draws_a[:50] == [b(logits, []) for _ in range(50)]
    freq = np.bincount(draws_a, minlength=3) / 3000
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.04)


def test_greedy_and_penalties():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert make_sampler(SamplingParams(temperature=0))(logits, []) == 1
    pen = apply_penalties(logits, [1, 1, 3], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                                                             repetition_penalty=2.0))
    assert pen[1] == pytest.approx(3.0 / 2.0 - 0.5 - 0.5) and pen[3] == pytest.approx(-2.0 - 0.5 - 0.25)
    assert pen[0] == 1.0 and pen[2] == 2.0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2),
                                 dict(max_tokens=-1), dict(stop=[""]), dict(presence_penalty=3)])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad).validate()


def test_stream_decoder_never_splits_utf8_and_holds_back_stop_prefixes():
    text = "héllo 🙂 wörld END tail"
    pieces = [bytes([b]) for b in text.encode()]  # one byte per "token"
    dec = StreamDecoder(lambda i: pieces[i], stop=["END"])
    out = []
    for i in range(len(pieces)):
        out.append(dec.push(i))
        if dec.stopped:
            break
    out.append(dec.flush())
    assert "".join(out) == "héllo 🙂 wörld " and all("\ufffd" not in p for p in out)
    assert dec.stopped


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


@pytest.mark.parametrize("seed", [-1, -(2 ** 70), 2 ** 70])
def test_any_integer_seed_is_a_valid_repeatable_seed(seed):
    logits = np.random.default_rng().normal(size=64).astype(np.float32)
    a = make_sampler(SamplingParams(temperature=1.0, seed=seed))
    b = make_sampler(SamplingParams(temperature=1.0, seed=seed))
    assert [a(logits, []) for _ in range(20)] == [b(logits, []) for _ in range(20)]


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-7])
def test_tiny_temperatures_sample_the_best_token_without_nan(temperature):
    """A temperature this small must act as greedy: dividing the logits by 1e-308 overflows."""
    rng = np.random.default_rng()
    logits = rng.standard_normal(500).astype(np.float32) * 5
    best = int(np.argmax(logits))
    sample = make_sampler(SamplingParams(temperature=temperature, top_p=0.9, min_p=0.05, seed=int(rng.integers(1 << 30))))
    assert all(sample(logits, []) == best for _ in range(5))
    assert not np.isnan(filter_logits(logits, SamplingParams(temperature=temperature))).any()
