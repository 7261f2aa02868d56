"""Tool calls on the server: `tool_choice` → a Kimi K2 tool-call grammar, call ids in the history,
and tool calls streamed as vLLM streams them (header delta first, then argument fragments).

The generated format (the model's own):

    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
    <|tool_call_end|> … <|tool_calls_section_end|>

IDX continues the count of calls in the history, one per call of the reply.
"""

from __future__ import annotations

import json
import re

from hybrid_runtime.chat_format import ARG_BEGIN, CALL_BEGIN, CALL_END, call_header
from hybrid_runtime.engine.grammar import json_schema_rule
from hybrid_runtime.errors import InvalidRequestError

MAX_PARALLEL_CALLS = 8
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KIMI_ID = re.compile(r"^functions\.[A-Za-z0-9_.\-]+:\d+$")


class ParamError(InvalidRequestError):
    """An invalid structured-output field (HTTP 400); `param` names it (as protocol.ParamError)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


# -- the request -----------------------------------------------------------------------------------
def tool_mode(body: dict, tools: list[dict]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", name); raises ParamError on a choice that cannot be met."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    for t in tools:
        name = t["function"]["name"]
        if not _NAME_RE.match(name):
            raise ParamError(f"tool name {name!r} must match ^[A-Za-z0-9_-]{{1,64}}$", "tools")
        params = t["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ParamError(f"the parameters of tool {name!r} must be a JSON schema object", "tools")
    if isinstance(choice, dict):
        return "named", choice["function"]["name"]  # protocol._tools checked that it names a tool
    if choice == "required" and not tools:
        raise ParamError('tool_choice "required" needs at least one tool in tools', "tool_choice")
    return choice, None


def history_call_ids(messages: list[dict]) -> tuple[list[dict], int]:
    """Rewrite call ids that are not `functions.NAME:IDX` (and the tool messages answering them);
    returns the messages and the number of calls in the history (the next IDX)."""
    renamed: dict[str, str] = {}
    count, out = 0, []
    for m in messages:
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    old = c.get("id")
                    new = old if isinstance(old, str) and _KIMI_ID.match(old) else f"functions.{fn['name']}:{count}"
                    if isinstance(old, str):
                        renamed[old] = new
                    c = {**c, "id": new}
                    count += 1
                calls.append(c)
            m = {**m, "tool_calls": calls}
        elif m.get("role") == "tool" and m.get("tool_call_id") in renamed:
            m = {**m, "tool_call_id": renamed[m["tool_call_id"]]}
        out.append(m)
    return out, count


# -- the grammar -----------------------------------------------------------------------------------
def _lark_string(text: str) -> str:
    return json.dumps(text)


def tool_section_rules(tools: list[dict], only: str | None, parallel: bool, first_idx: int) -> str:
    """Lark rules: `section` = one tool-call section of 1 (or up to MAX_PARALLEL_CALLS) calls."""
    allowed = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    rules = []
    for j, fn in enumerate(allowed):
        rules.append(json_schema_rule(fn.get("parameters") or {"type": "object"}, f"args_{j}"))
    n = MAX_PARALLEL_CALLS if parallel else 1
    for k in range(n):
        ids = [_lark_string("functions." + fn["name"] + f":{first_idx + k}") for fn in allowed]
        alts = " | ".join(f"{call_id} <|tool_call_argument_begin|> args_{j}" for j, call_id in enumerate(ids))
        rules.append(f"call_{k}: <|tool_call_begin|> ({alts}) <|tool_call_end|>\n")
        rules.append(f"calls_{k}: call_{k}" + (f" calls_{k + 1}?\n" if k + 1 < n else "\n"))
    rules.append("section: <|tool_calls_section_begin|> calls_0 <|tool_calls_section_end|>\n")
    return "".join(rules)


# -- streaming -------------------------------------------------------------------------------------
class ToolCallDeltas:
    """OpenAI `tool_calls` deltas from a StreamParser: the first delta of a call carries index, id,
    type and name; later ones carry argument fragments."""

    def __init__(self):
        self._sent: list[list] = []  # per call: [id, name, argument text sent]

    def deltas(self, parser) -> list[dict]:
        out: list[dict] = []
        done = parser.tool_calls
        for i, c in enumerate(done):
            self._send(out, i, c.id, c.name, c.arguments)
        body = parser.open_section
        if body is not None:
            for j, seg in enumerate(body.split(CALL_BEGIN)[1:]):
                if ARG_BEGIN not in seg:
                    break
                raw_id, args = seg.split(ARG_BEGIN, 1)
                header = call_header(raw_id, len(done) + j)
                if header is None:
                    break
                args = args.split(CALL_END, 1)[0] if CALL_END in args else _without_partial_end(args)
                self._send(out, len(done) + j, header[0], header[1], args.lstrip())
        return out

    def _send(self, out: list, index: int, call_id: str, name: str, args: str) -> None:
        if index == len(self._sent):
            self._sent.append([call_id, name, ""])
            out.append({"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
        sent = self._sent[index]
        if index >= len(self._sent) or not args.startswith(sent[2]) or len(args) == len(sent[2]):
            return
        out.append({"index": index, "function": {"arguments": args[len(sent[2]):]}})
        sent[2] = args


def _without_partial_end(text: str) -> str:
    """`text` less a tail that may be the start of <|tool_call_end|>."""
    for n in range(min(len(CALL_END) - 1, len(text)), 0, -1):
        if text.endswith(CALL_END[:n]):
            return text[:-n]
    return text
