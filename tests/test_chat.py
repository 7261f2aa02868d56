"""The terminal chat driven through a pseudo-terminal (pexpect)."""

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from hybrid_runtime.chat import ChatSession, load_history, save
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.synth import cached_model

PROMPT = ">>> "
STATS = r"\[ Prompt: [0-9.]+ t/s \| Generation: [0-9.]+ t/s \]"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "models"


def default_signals():
    """The child starts with SIGINT/SIGTERM at their defaults, whatever this test run inherited."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def ignored_sigint():
    """The child starts as a background job of a non-interactive shell (or nohup) would: SIGINT ignored."""
    default_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn(model, *args, preexec_fn=default_signals):
    env = dict(os.environ, TERM="dumb", COLUMNS="200")
    child = pexpect.spawn(sys.executable, ["-m", "hybrid_runtime.cli", "chat", str(model), "--threads", "1", *args],
                          encoding="utf-8", timeout=60, env=env, dimensions=(50, 200), preexec_fn=preexec_fn)
    child.expect_exact(PROMPT)
    return child


def command(child, line, expect):
    child.sendline(line)
    child.expect(expect)
    child.expect_exact(PROMPT)


def finish(child):
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")


@pytest.fixture(scope="module")
def tiny(models_dir):
    path = cached_model("kimi-k2-tiny", "Q4_K_M", models_dir)[0]
    # Numba compiles the compiled step on first use (about a minute on a fresh clone's 2 cores) and
    # caches it on disk: do it here, so that no pexpect timeout in a chat child waits on it
    import hybrid_runtime as hr

    with hr.load(path, threads=1, n_ctx=64) as m:
        cache = m.new_cache()
        m.forward([1, 2, 3], cache)
        m.forward([4], cache)
    return path


def test_two_turns_clear_stats(tiny):
    c = spawn(tiny, "--n-ctx", "512", "--seed", "1")
    command(c, "/set max_tokens 8", "Set max_tokens to 8")
    command(c, "hello there", STATS)
    command(c, "and again", STATS)
    c.sendline("/stats")
    c.expect(r"Last reply: (\d+) prompt tokens \((\d+) reused\)")
    assert int(c.match.group(2)) > 0  # turn 2 reused turn 1's cache
    c.expect_exact(PROMPT)
    command(c, "/clear", "Cleared the conversation")
    command(c, "/show", r"Conversation: 0 messages")
    command(c, "/help", "/save FILE")
    finish(c)


def test_bad_set_and_unknown_command(tiny):
    c = spawn(tiny, "--n-ctx", "256")
    command(c, "/set temperature abc", "Invalid value for temperature")
    command(c, "/set top_p 5", "Invalid value for top_p")
    command(c, "/set nonsense 1", "Unknown parameter")
    command(c, "/set", "Usage: /set PARAM VALUE")
    command(c, "/frobnicate", "Unknown command")
    command(c, "/load /nonexistent/file.json", "Could not read")
    finish(c)


def test_set_format_json_gives_json_replies(tiny):
    c = spawn(tiny, "--n-ctx", "512")
    command(c, "/set temperature 1.0", "Set temperature to 1.0")
    command(c, "/set max_tokens 12", "Set max_tokens to 12")
    command(c, "/set format json", "Set format to json")
    for _ in range(3):
        c.sendline("describe a cat")
        c.expect(STATS)
        reply = c.before[c.before.index("{"): c.before.rindex("}") + 1]
        assert isinstance(json.loads(reply), dict)
        c.expect_exact(PROMPT)
    command(c, "/set format yaml", "Usage: /set format json|text")
    command(c, "/show", "format=json")
    command(c, "/set format text", "Set format to text")
    finish(c)


def test_save_and_load(tiny, tmp_path):
    path = tmp_path / "chat.json"
    c = spawn(tiny, "--n-ctx", "512", "--seed", "2", "--system", "Be brief.")
    command(c, "/set max_tokens 5", "Set max_tokens")
    command(c, "first question", STATS)
    command(c, f"/save {path}", "Saved 2 messages")
    saved = json.loads(path.read_text())
    assert saved["system"] == "Be brief." and saved["messages"][0]["content"] == "first question"
    command(c, "/clear", "Cleared")
    command(c, f"/load {path}", "Loaded 2 messages")
    command(c, "/show", "Conversation: 2 messages")
    (tmp_path / "bad.json").write_text("[1, 2")
    command(c, f"/load {tmp_path / 'bad.json'}", "is not a saved conversation")
    finish(c)


def test_multiline_ctrl_c_on_empty_line_and_ctrl_d(tiny):
    c = spawn(tiny, "--n-ctx", "512")
    command(c, "/set max_tokens 3", "Set max_tokens")
    c.sendline('"""first line')
    c.expect_exact("... ")
    c.sendline('second line"""')
    c.expect(STATS)
    c.expect_exact(PROMPT)
    command(c, "/show", "Conversation: 2 messages")
    c.sendintr()
    c.expect("Use Ctrl-D or /bye to exit")
    c.expect_exact(PROMPT)
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_ctrl_c_works_when_started_with_sigint_ignored(tiny):
    c = spawn(tiny, "--n-ctx", "256", preexec_fn=ignored_sigint)
    c.sendintr()
    c.expect("Use Ctrl-D or /bye to exit")
    c.expect_exact(PROMPT)
    command(c, "/set max_tokens 3", "Set max_tokens")
    command(c, "hello", STATS)
    finish(c)


def _session(**kw) -> ChatSession:
    return ChatSession(engine=None, params=SamplingParams(max_tokens=7, **kw), system="sys",
                       messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_save_replaces_the_file_by_rename_and_leaves_no_temporary(tmp_path, capsys):
    path = tmp_path / "chat.json"
    path.write_text("old")
    inode = path.stat().st_ino
    save(_session(), str(path))
    assert "Saved 2 messages" in capsys.readouterr().out
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert json.loads(path.read_text())["messages"][1]["content"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]
    save(_session(), str(tmp_path))  # a directory: refused, nothing left behind
    assert "Could not save" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]


def _saved(tmp_path) -> Path:
    path = tmp_path / "good.json"
    save(_session(temperature=0.3), str(path))
    return path


CORRUPT = {
    "truncated": lambda good: good[: len(good) // 2],
    "invalid utf-8": lambda good: good.replace(b'"q"', b'"\xff\xfe"'),
    "a list": lambda good: b"[1, 2, 3]",
    "deep nesting": lambda good: b"[" * 100_000 + b"]" * 100_000,
    "message without content": lambda good: json.dumps({"messages": [{"role": "user"}]}).encode(),
    "unknown role": lambda good: json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
    "setting of the wrong type": lambda good: good.replace(b'"temperature": 0.3', b'"temperature": "hot"'),
    "float top_k": lambda good: good.replace(b'"top_k": 0', b'"top_k": 1.5'),
    "stop as a string": lambda good: good.replace(b'"stop": []', b'"stop": "x"'),
    "out of range": lambda good: good.replace(b'"temperature": 0.3', b'"temperature": -1'),
    "empty file": lambda good: b"",
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_load_of_a_corrupt_file_reports_it_and_keeps_the_chat(tmp_path, capsys, kind):
    good = _saved(tmp_path).read_bytes()
    bad = CORRUPT[kind](good)
    assert bad != good
    path = tmp_path / "bad.json"
    path.write_bytes(bad)
    s = _session()
    before = (list(s.messages), s.system, s.params)
    capsys.readouterr()
    load_history(s, str(path))
    out = capsys.readouterr().out
    assert "is not a saved conversation" in out and len(out.splitlines()) == 1
    assert (s.messages, s.system, s.params) == before


def test_load_restores_what_save_wrote(tmp_path, capsys):
    path = _saved(tmp_path)
    s = ChatSession(engine=None, params=SamplingParams())
    load_history(s, str(path))
    assert s.messages == _session().messages and s.system == "sys" and s.params.temperature == 0.3


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(models_dir):
    demo = cached_model("kimi-k2-demo", "Q4_K_M", models_dir)[0]
    c = spawn(demo, "--n-ctx", "4096", "--seed", "4")
    command(c, "/set max_tokens 4000", "Set max_tokens")
    for attempt in range(3):  # a random model may end a reply early; try another message then
        c.sendline(f"write a long story {attempt}")
        c.expect_exact(f"story {attempt}\r\n")  # the echo of the line typed
        c.expect(r"\S{3}")  # the reply is streaming
        c.sendintr()
        i = c.expect([r"\[reply stopped\]", STATS])
        c.expect_exact(PROMPT)
        if i == 0:
            break
    else:
        pytest.fail("every reply ended before Ctrl-C")
    command(c, "/show", "Conversation: [1-9]")
    command(c, "/set max_tokens 3", "Set max_tokens")
    command(c, "still there?", STATS)
    finish(c)


def test_single_turn(tiny):
    child = pexpect.spawn(sys.executable, ["-m", "hybrid_runtime.cli", "chat", str(tiny), "--single-turn", "--threads", "1", "--n-ctx",
                                           "128", "--seed", "3", "hello"], encoding="utf-8", timeout=60,
                          preexec_fn=default_signals)
    child.expect(STATS)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
