"""Kimi K2 assistant output → OpenAI message parts: content, reasoning_content and tool_calls.

Generated text (special tokens included as their text) looks like

    <think>reasoning</think>answer<|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
    <|tool_calls_section_end|>

`parse_assistant` parses a whole reply; `StreamParser` does the same piece by piece, holding back
text that may be the start of a marker. Neither ever raises: what does not parse is content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

THINK_BEGIN, THINK_END = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
# end-of-turn markup that must never show up in content
_HIDDEN = ("<|im_end|>", "<|im_middle|>", "<|im_assistant|>", "<|im_user|>", "<|im_system|>")
_MARKERS = (THINK_BEGIN, THINK_END, SECTION_BEGIN, SECTION_END) + _HIDDEN
_CALL_RE = re.compile(re.escape(CALL_BEGIN) + r"\s*(?P<id>.*?)\s*" + re.escape(ARG_BEGIN)
                      + r"(?P<args>.*?)" + re.escape(CALL_END), re.S)
_ID_RE = re.compile(r"^(?:functions\.)?(?P<name>[A-Za-z0-9_.\-]+?)(?::(?P<idx>\d+))?$")


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


@dataclass(slots=True)
class AssistantMessage:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _strip_hidden(text: str) -> str:
    for m in _HIDDEN:
        text = text.replace(m, "")
    return text


def call_header(raw_id: str, position: int) -> tuple[str, str] | None:
    """`functions.NAME:IDX` (as generated) → (id, name); None if it is no function id."""
    ident = _ID_RE.match(raw_id.strip())
    if not ident:
        return None
    name = ident.group("name").rsplit(".", 1)[-1]
    idx = ident.group("idx") if ident.group("idx") is not None else str(position)
    return f"functions.{name}:{idx}", name


def parse_tool_call(raw: str, position: int) -> ToolCall | None:
    """One `<|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>`; None if malformed."""
    m = _CALL_RE.fullmatch(raw.strip())
    if not m:
        return None
    header = call_header(m.group("id"), position)
    if header is None:
        return None
    try:
        args = json.loads(m.group("args"))
    except ValueError:
        return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=header[0], name=header[1], arguments=m.group("args").strip())


def parse_tool_section(section: str) -> tuple[list[ToolCall], str]:
    """The calls inside one section body; what does not parse comes back as text."""
    calls: list[ToolCall] = []
    leftover: list[str] = []
    pos = 0
    for m in _CALL_RE.finditer(section):
        leftover.append(section[pos : m.start()])
        call = parse_tool_call(m.group(0), len(calls))
        if call is None:
            leftover.append(m.group(0))
        else:
            calls.append(call)
        pos = m.end()
    leftover.append(section[pos:])
    return calls, "".join(leftover).strip()


def parse_assistant(text: str, in_think: bool = False) -> AssistantMessage:
    """Split a whole assistant reply. `in_think`: the prompt already opened a <think> block."""
    parser = StreamParser(in_think=in_think)
    out = AssistantMessage()
    for kind, piece in parser.feed(text) + parser.finish():
        if kind == "content":
            out.content += piece
        elif kind == "reasoning":
            out.reasoning_content += piece
    out.tool_calls = parser.tool_calls
    return out


class StreamParser:
    """Incremental parser: `feed(text)` and `finish()` return [(kind, text)] with kind
    "content" or "reasoning"; complete tool calls accumulate in `tool_calls`."""

    def __init__(self, in_think: bool = False, parse_tools: bool = True):
        self.in_think = in_think
        self.parse_tools = parse_tools
        self.tool_calls: list[ToolCall] = []
        self._buf = ""  # text not yet classified
        self._in_section = False
        self._section = ""  # body of the open tool-call section

    @property
    def open_section(self) -> str | None:
        """The body so far of a tool-call section still open (None outside one)."""
        return self._section if self._in_section else None

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        out = self._drain(final=True)
        if self._in_section:  # the section never closed (length cut): salvage, rest is content
            out += self._close_section()
        return out

    # -- internals ----------------------------------------------------------------------------
    def _drain(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self._buf:
            if self._in_section:
                if not self._drain_section():
                    break
                out += self._close_section()
                continue
            i, marker = self._next_marker()
            if marker is None:
                keep = 0 if final else _partial_marker_len(self._buf)
                self._emit(out, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                break
            self._emit(out, self._buf[:i])
            self._buf = self._buf[i + len(marker) :]
            self._on_marker(marker, out)
        return out

    def _next_marker(self) -> tuple[int, str | None]:
        best, found = len(self._buf) + 1, None
        for m in _MARKERS:
            if m == SECTION_BEGIN and not self.parse_tools:
                continue
            i = self._buf.find(m)
            if 0 <= i < best:
                best, found = i, m
        return best, found

    def _on_marker(self, marker: str, out: list) -> None:
        if marker == THINK_BEGIN:
            self.in_think = True
        elif marker == THINK_END:
            self.in_think = False
        elif marker == SECTION_BEGIN:  # a tool-call section also ends an open <think> block
            self._in_section, self._section, self.in_think = True, "", False
        # SECTION_END outside a section and the hidden turn markup are dropped

    def _emit(self, out: list, text: str) -> None:
        if text:
            out.append(("reasoning" if self.in_think else "content", text))

    def _drain_section(self) -> bool:
        """Move buffered text into the section; True once its end marker arrived."""
        text = self._section + self._buf  # the end marker may straddle two pieces
        i = text.find(SECTION_END)
        if i < 0:
            self._section, self._buf = text, ""
            return False
        self._section, self._buf = text[:i], text[i + len(SECTION_END) :]
        return True

    def _close_section(self) -> list[tuple[str, str]]:
        calls, leftover = parse_tool_section(self._section)
        self._in_section, self._section = False, ""
        for c in calls:  # ids stay unique across sections
            if any(c.id == old.id for old in self.tool_calls):
                c.id = f"functions.{c.name}:{len(self.tool_calls)}"
            self.tool_calls.append(c)
        leftover = _strip_hidden(leftover)
        return [("content", leftover)] if leftover else []


def _partial_marker_len(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    best = 0
    for m in _MARKERS:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def prompt_opens_think(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an open <think> block (R1-style templates)."""
    tail = prompt_text.rstrip()
    return tail.rfind(THINK_BEGIN) > tail.rfind(THINK_END)
