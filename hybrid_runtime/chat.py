"""`hybrid-runtime chat`: an interactive terminal chat on the engine (ollama / llama-cli conventions)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from hybrid_runtime import cli_options as opt

from hybrid_runtime.chat_format import StreamParser, prompt_opens_think
from hybrid_runtime.engine.generate import Stats
from hybrid_runtime.engine.grammar import fitted_json_constraint
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.errors import HybridError, InvalidRequestError
from hybrid_runtime.util import write_atomic

HELP = """Commands:
  /set PARAM VALUE   set a sampling parameter (/set alone lists them)
  /system TEXT       set the system prompt (clears the conversation)
  /show              show the settings and the model
  /clear             forget the conversation
  /save FILE         save the conversation as JSON
  /load FILE         load a conversation saved with /save
  /stats             timings of the last reply and of the session
  /help              this help
  /bye, /exit        leave (Ctrl-D works too)
Start and end a multi-line message with \"\"\". Ctrl-C stops a reply."""

# name → (SamplingParams field, type)
_SETTABLE = {
    "temperature": ("temperature", float), "temp": ("temperature", float), "top_p": ("top_p", float),
    "top_k": ("top_k", int), "min_p": ("min_p", float), "max_tokens": ("max_tokens", int),
    "seed": ("seed", int), "repeat_penalty": ("repetition_penalty", float),
    "repetition_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


@dataclass(slots=True)
class ChatSession:
    engine: object
    params: SamplingParams
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    last_stats: Stats | None = None
    total: Stats = field(default_factory=Stats)
    format: str = "text"  # "text" | "json" (/set format json: every reply is one JSON object)

    @property
    def model(self):
        return self.engine.model

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages


# -- replies ---------------------------------------------------------------------------------------
class ReplyPrinter:
    """Writes a streamed reply: reasoning dim (when a terminal), content plain."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.color = self.out.isatty()
        self.content, self.reasoning = "", ""
        self._last_kind = None

    def show(self, events: list[tuple[str, str]]) -> None:
        for kind, text in events:
            if kind == "reasoning":
                self.reasoning += text
                self._write(f"{_DIM}{text}{_RESET}" if self.color else text)
            else:
                if self._last_kind == "reasoning":
                    self._write("\n")
                self.content += text
                self._write(text)
            self._last_kind = kind

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()


def stats_line(s: Stats) -> str:
    return f"[ Prompt: {s.prefill_tps:.1f} t/s | Generation: {s.decode_tps:.1f} t/s ]"


@contextmanager
def _sigint_cancels():
    """While a reply runs, Ctrl-C only flags it (no exception mid-print); `hits` records the presses."""
    hits: list = []

    def on_sigint(signum, frame):
        hits.append(signum)
        for req in _live_requests:
            req.cancelled.set()  # the worker ends the reply at its next step

    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: no signal handling
        old = None
    try:
        yield hits
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


_live_requests: list = []  # the request of the reply under way (for the SIGINT handler)


def _stream_reply(handle, parser: StreamParser, printer: ReplyPrinter) -> Stats | None:
    stats = None
    for step in handle:
        printer.show(parser.feed(step.text))
        stats = step.stats or stats
    printer.show(parser.finish())
    return stats


def reply(s: ChatSession, text: str, out=None, stats_to_stderr: bool = False) -> bool:
    """One user turn: send, stream the answer, record it. False if it could not run."""
    tok, n_ctx = s.model.tokenizer, s.model.n_ctx
    convo = s.conversation() + [{"role": "user", "content": text}]
    with _sigint_cancels() as hits:
        prompt = tok.encode_chat(convo)
        if len(prompt) >= n_ctx:
            _say(f"The conversation ({len(prompt)} tokens) no longer fits the context of {n_ctx}; /clear to start over.")
            return False
        params = dataclasses.replace(s.params, max_tokens=min(s.params.max_tokens, n_ctx - len(prompt)))
        opened = prompt_opens_think(tok.render_chat(convo)[-64:])
        try:
            constraint = fitted_json_constraint(tok, True, params.max_tokens, opened) if s.format == "json" else None
        except InvalidRequestError as e:
            _say(f"{e}; raise max_tokens with /set max_tokens N.")
            return False
        handle = s.engine.submit(prompt, params, constraint=constraint)
        _live_requests[:] = [handle.request]
        if hits:
            handle.cancel()
        parser = StreamParser(in_think=opened, parse_tools=False)
        printer = ReplyPrinter(out)
        try:
            stats = _stream_reply(handle, parser, printer)
        finally:
            _live_requests.clear()
    printer.out.write("\n")
    if hits:
        _say("[reply stopped]")
    s.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": printer.content}]
    if stats is not None:
        s.last_stats = stats
        _add_stats(s.total, stats)
        if stats_to_stderr:
            print(stats_line(stats), file=sys.stderr)
        else:
            _say(stats_line(stats), dim=True)
    return True


def _add_stats(total: Stats, s: Stats) -> None:
    for f in ("prompt_tokens", "cached_tokens", "generated_tokens", "prefill_s", "decode_s"):
        setattr(total, f, getattr(total, f) + getattr(s, f))


def _say(msg: str, dim: bool = False) -> None:
    color = dim and sys.stdout.isatty()
    sys.stdout.write(f"{_DIM}{msg}{_RESET}\n" if color else f"{msg}\n")
    sys.stdout.flush()


# -- commands --------------------------------------------------------------------------------------
def set_param(s: ChatSession, args: str) -> None:
    parts = args.split()
    if len(parts) != 2:
        _say("Usage: /set PARAM VALUE with PARAM one of " + ", ".join(sorted(_SETTABLE)) + ", format (json|text)")
        return
    name, raw = parts[0].lower(), parts[1]
    if name == "format":
        if raw.lower() not in ("json", "text"):
            _say("Usage: /set format json|text")
            return
        s.format = raw.lower()
        _say(f"Set format to {s.format}.")
        return
    if name not in _SETTABLE:
        _say(f"Unknown parameter '{name}'; choose one of {', '.join(sorted(_SETTABLE))}.")
        return
    attr, kind = _SETTABLE[name]
    try:
        value = None if (attr == "seed" and raw.lower() in ("none", "random")) else kind(raw)
        s.params = dataclasses.replace(s.params, **{attr: value}).validate()
    except (ValueError, InvalidRequestError) as e:
        _say(f"Invalid value for {name}: {raw!r} ({e}).")
        return
    _say(f"Set {attr} to {value}.")


def show(s: ChatSession) -> None:
    m = s.model
    c = m.config
    _say(f"Model: {m.file.path.name} ({c.arch}, {c.n_layer} layers, {c.n_expert} experts × {c.n_ff_expert}, "
         f"{c.n_expert_used} used, vocab {c.n_vocab})")
    _say(f"Context: {m.n_ctx} tokens · compute: {m.options.compute}")
    _say("Settings: " + ", ".join(f"{f.name}={getattr(s.params, f.name)}" for f in dataclasses.fields(s.params)
                                  if f.name not in ("stop", "logprobs")) + f", format={s.format}")
    _say(f"System: {s.system!r}" if s.system else "System: (the template's default)")
    _say(f"Conversation: {len(s.messages)} messages")


def show_stats(s: ChatSession) -> None:
    if s.last_stats is None:
        _say("No reply yet.")
        return
    last, t = s.last_stats, s.total
    _say(f"Last reply: {last.prompt_tokens} prompt tokens ({last.cached_tokens} reused), "
         f"{last.generated_tokens} generated. {stats_line(last)}")
    _say(f"Session: {t.prompt_tokens} prompt tokens ({t.cached_tokens} reused), {t.generated_tokens} generated, "
         f"{t.prefill_s + t.decode_s:.1f} s of model time")


def save(s: ChatSession, path: str) -> None:
    if not path:
        _say("Usage: /save FILE")
        return
    data = {"version": 1, "system": s.system, "messages": s.messages,
            "settings": {f.name: getattr(s.params, f.name) for f in dataclasses.fields(s.params)}}
    try:
        write_atomic(Path(path).expanduser(), json.dumps(data, indent=2, ensure_ascii=False))
    except OSError as e:
        _say(f"Could not save to {path}: {e.strerror or e}.")
        return
    _say(f"Saved {len(s.messages)} messages to {path}.")


def load_history(s: ChatSession, path: str) -> None:
    if not path:
        _say("Usage: /load FILE")
        return
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        msgs, system = _check_history(data)
        params = dataclasses.replace(s.params, **_known_settings(data.get("settings") or {})).validate()
    except OSError as e:
        _say(f"Could not read {path}: {e.strerror or e}.")
        return
    except (ValueError, TypeError, RecursionError, InvalidRequestError) as e:  # UnicodeDecodeError is a ValueError
        _say(f"{path} is not a saved conversation ({_short(e)}).")
        return
    s.messages, s.system, s.params = msgs, system, params
    _say(f"Loaded {len(msgs)} messages from {path}.")


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _check_history(data) -> tuple[list[dict], str | None]:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError("expected an object with a list of messages")
    msgs = data["messages"]
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system", "tool")
                and isinstance(m.get("content"), str)):
            raise ValueError("each message needs a role and a text content")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("system must be a string")
    return [dict(m) for m in msgs], system


def _known_settings(settings: dict) -> dict:
    if not isinstance(settings, dict):
        raise ValueError("settings must be an object")
    names = {f.name for f in dataclasses.fields(SamplingParams)} - {"logprobs"}
    known = {k: v for k, v in settings.items() if k in names}
    for k, v in known.items():
        if not _setting_type_ok(k, v):
            raise ValueError(f"setting {k} has the wrong type ({type(v).__name__})")
    return known


def _setting_type_ok(name: str, value) -> bool:
    if name == "stop":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if name == "seed":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    default = getattr(SamplingParams(), name)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    return isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))


def run_command(s: ChatSession, line: str) -> bool:
    """Handle a /command; False means leave."""
    cmd, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    cmd = cmd.lower()
    if cmd in ("/bye", "/exit", "/quit"):
        return False
    actions = {
        "/help": lambda: _say(HELP), "/?": lambda: _say(HELP),
        "/clear": lambda: (s.messages.clear(), _say("Cleared the conversation.")),
        "/system": lambda: _set_system(s, arg),
        "/set": lambda: set_param(s, arg), "/show": lambda: show(s), "/stats": lambda: show_stats(s),
        "/save": lambda: save(s, arg), "/load": lambda: load_history(s, arg),
    }
    if cmd not in actions:
        _say(f"Unknown command '{cmd}'. Type /help for the list.")
        return True
    actions[cmd]()
    return True


def _set_system(s: ChatSession, text: str) -> None:
    if not text:
        _say(f"System prompt: {s.system!r}" if s.system else "No system prompt set. Usage: /system TEXT")
        return
    s.system = text
    s.messages.clear()
    _say("Set the system prompt and cleared the conversation.")


# -- input loop ------------------------------------------------------------------------------------
def read_message() -> str:
    """One message: a line, or several between \"\"\" marks. Raises EOFError / KeyboardInterrupt."""
    line = input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    body = line.lstrip()[3:]
    if body.rstrip().endswith('"""') and body.strip():
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        more = input("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(more)


def repl(s: ChatSession) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    _say("Type a message, /help for commands, /bye or Ctrl-D to leave.")
    while True:
        try:
            line = read_message()
        except EOFError:
            _say("")
            return
        except KeyboardInterrupt:
            _say("\nUse Ctrl-D or /bye to exit.")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not run_command(s, line):
                return
            continue
        try:
            reply(s, line)
        except HybridError as e:
            _say(f"error: {e}")


# -- the command -----------------------------------------------------------------------------------
def install_sigint_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt however we were started (a background job or nohup inherits
    SIGINT ignored, and Python then leaves it ignored): the prompt, the load and a reply rely on it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _load_model(model: Path, options: dict):
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from hybrid_runtime.api import load

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("loading {task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        progress.add_task(model.name, total=None)
        return load(model, **options)


def chat_command(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="GGUF model file (first part of a split model)."),
    prompt: Optional[str] = typer.Argument(None, help="With --single-turn: the prompt (default: read stdin)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    single_turn: bool = typer.Option(False, "--single-turn", help="Answer one prompt (argument or stdin) and exit."),
    temp: float = typer.Option(0.8, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: random)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=1, help="Context length in tokens."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
    compute: str = typer.Option("fast", "--compute", help="'fast' (quantized CPU experts) or 'reference' (exact float path)."),
    numa_config: Optional[str] = opt.NumaConfig,
    expert_store: str = opt.ExpertStore,
    device: str = opt.Device,
    gpu_mem: Optional[str] = opt.GpuMem,
    cpu_moe: bool = opt.CpuMoe,
    n_cpu_moe: Optional[int] = opt.NCpuMoe,
    override: list[str] = opt.Override,
    expert_profile: Optional[str] = opt.ExpertProfile,
    record_routing: Optional[str] = opt.RecordRouting,
    speculative_prefetch: bool = opt.SpeculativePrefetch,
    cuda_graphs: bool = opt.CudaGraphs,
) -> None:
    """Chat with MODEL in the terminal."""
    from hybrid_runtime.engine.scheduler import Engine

    install_sigint_handler()
    options = {k: v for k, v in (("n_ctx", n_ctx), ("threads", threads), ("compute", compute)) if v is not None}
    try:
        options.update(opt.load_options(numa_config, expert_store, device, gpu_mem, cpu_moe, n_cpu_moe, override))
        options.update(opt.gpu_path_options(expert_profile, record_routing, speculative_prefetch, cuda_graphs))
        params = SamplingParams(temperature=temp, top_p=top_p, seed=seed, max_tokens=1 << 30).validate()
        m = _load_model(model, options)
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    note = opt.inert_note(m)
    if note:
        print(f"{_DIM}note: {note}{_RESET}" if sys.stderr.isatty() else f"note: {note}", file=sys.stderr)
    engine = Engine(m, max_queue=0, pool_size=1)
    session = ChatSession(engine, params, system)
    try:
        if single_turn:
            _single_turn(session, prompt)
        else:
            repl(session)
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1)
    finally:
        engine.close()
        failed = opt.close_model(m)  # writes --expert-profile
        if failed:
            print(f"error: {failed}", file=sys.stderr)
    if failed:
        raise typer.Exit(1)


def _single_turn(s: ChatSession, prompt: str | None) -> None:
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise InvalidRequestError("no prompt given (pass it as an argument or on stdin)")
    if not reply(s, text.strip(), stats_to_stderr=True):
        raise typer.Exit(1)
