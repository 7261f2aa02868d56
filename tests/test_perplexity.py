"""perplexity.py against direct per-position formulas, and the `perplexity` command as a user runs it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_cli import run

from hybrid_runtime import perplexity as px
from hybrid_runtime.errors import InvalidRequestError


def _random_case(rng, n_ctx=8, n_windows=3, vocab=11):
    tokens = rng.integers(0, vocab, n_ctx * n_windows + int(rng.integers(0, n_ctx))).tolist()
    windows = px.make_windows(tokens, n_ctx)
    logits = {tuple(w): rng.normal(0, 3, (n_ctx, vocab)).astype(np.float32) for w in windows}
    return windows, logits


def test_windows_score_the_second_half_of_each():
    rng = np.random.default_rng()
    windows, logits = _random_case(rng)
    piece = {t: b"x" * (1 + t % 3) for t in range(11)}
    lp = px.scored_log_probs(lambda w: logits[tuple(w)], windows)
    got = px.perplexity(lp, windows, piece.__getitem__)
    nll, n_bytes, n = 0.0, 0, 0
    for w in windows:                                      # direct: position j predicts token j + 1
        for j in range(4, 7):
            z = logits[tuple(w)][j].astype(np.float64)
            nll += math.log(np.exp(z - z.max()).sum()) + z.max() - z[w[j + 1]]
            n_bytes += len(piece[w[j + 1]])
            n += 1
    assert windows.n_windows == 3 and got.n_scored == n == 9 and got.n_bytes == n_bytes
    assert math.isclose(got.ppl, math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(got.bits_per_byte, nll / math.log(2) / n_bytes, rel_tol=1e-5)


def test_kl_divergence_matches_the_definition():
    rng = np.random.default_rng()
    a = px.log_softmax(rng.normal(0, 2, (2, 5, 7)))
    b = px.log_softmax(a + rng.normal(0, 0.3, a.shape))
    d = px.kl_divergence(a, b)
    per = [sum(math.exp(p) * (p - q) for p, q in zip(a[i, j], b[i, j])) for i in range(2) for j in range(5)]
    assert math.isclose(d.mean, np.mean(per), rel_tol=1e-4) and math.isclose(d.max, max(per), rel_tol=1e-4)
    assert d.top1 == np.mean(a.reshape(-1, 7).argmax(-1) == b.reshape(-1, 7).argmax(-1))
    same = px.kl_divergence(a, a)
    assert same.mean < 1e-7 and same.top1 == 1.0


def test_saved_logits_round_trip_and_refuse_other_tokens(tmp_path):
    rng = np.random.default_rng()
    windows, logits = _random_case(rng)
    lp = px.scored_log_probs(lambda w: logits[tuple(w)], windows)
    px.save_log_probs(tmp_path / "base.bin", lp, windows)
    assert np.array_equal(px.load_log_probs(tmp_path / "base.bin", windows, 11), lp)
    other = px.make_windows((windows.tokens[::-1]).tolist(), windows.n_ctx)
    with pytest.raises(InvalidRequestError, match="other tokens"):
        px.load_log_probs(tmp_path / "base.bin", other, 11)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        px.load_log_probs(tmp_path / "base.bin", windows, 12)
    (tmp_path / "junk.bin").write_bytes(rng.bytes(300))
    with pytest.raises(InvalidRequestError, match="not a logits file"):
        px.load_log_probs(tmp_path / "junk.bin", windows, 11)


@pytest.mark.parametrize("n_ctx", [3, 7, 0])
def test_bad_window_lengths_are_refused(n_ctx):
    with pytest.raises(InvalidRequestError):
        px.make_windows(list(range(100)), n_ctx)


# -- the command --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny):
    return tiny("kimi-k2-tiny", "Q4_K_M")[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.py"
    path.write_text(open(px.__file__).read())
    return path


def test_command_saves_logits_then_measures_kld_and_compares_with_llama_cpp(model, text, tmp_path):
    base = tmp_path / "base.logits"
    r = run("perplexity", model, "--file", text, "-c", "64", "--chunks", "3", "--threads", "1",
            "--save-logits", base, "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)["ours"]
    assert first["windows"] == 3 and first["scored_tokens"] == 3 * 31 and first["perplexity"] > 1
    r = run("perplexity", model, "--file", text, "-c", "64", "--chunks", "3", "--threads", "1",
            "--kl-divergence", base, "--compare-llama-cpp")
    assert r.returncode == 0, r.stderr
    assert "KLD vs base.logits: mean 0.000000" in r.stdout      # the same path against itself
    assert "top-1 agreement 100.00 %" in r.stdout and "ours vs llama.cpp:" in r.stdout


@pytest.mark.parametrize("case,message", [
    ("missing file", "No such file"), ("short text", "at least n_ctx"), ("corrupt logits", "not a logits file"),
    ("missing logits", "no such logits file"), ("odd n-ctx", "even number"),
])
def test_bad_input_is_one_line(model, text, tmp_path, case, message):
    junk = tmp_path / "junk.logits"
    junk.write_bytes(np.random.default_rng().bytes(200))
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    args = {"missing file": ["--file", tmp_path / "nope.txt"], "short text": ["--file", short],
            "corrupt logits": ["--file", text, "--kl-divergence", junk],
            "missing logits": ["--file", text, "--kl-divergence", tmp_path / "nope.logits"],
            "odd n-ctx": ["--file", text, "-c", "63"]}[case]
    r = run("perplexity", model, "-c", "64", *args, "--threads", "1", "--chunks", "1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and message in errors[0], r.stderr


def test_bad_flag_is_a_usage_error(model, text):
    r = run("perplexity", model, "--file", text, "--kl-divergance", "x")
    assert r.returncode == 2
