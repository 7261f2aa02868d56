"""Structured output on the server: `response_format`, `grammar` and `tool_choice` → one grammar
constraint per request (engine/grammar.py), or None for free text.

    chat:        start: think? BODY        BODY = json | section | TEXT? section? | (json | section) | TEXT?
    completions: start: json               (response_format)   or the request's own Lark `grammar`

`think` is K2-Thinking's <think>…</think> block, present when the chat template writes one and
`chat_template_kwargs.thinking` is not false on a template that reads it (K2.5); required first
when the prompt already opened it. With thinking off, free text is constrained to TEXT, so the model
cannot open a <think> block of its own either.
TEXT is plain text: no special token, so no tool-call marker can appear in content.
"""

from __future__ import annotations

from hybrid_runtime.engine.grammar import GrammarError, compile_grammar, json_schema_rule
from hybrid_runtime.server.tools import ParamError, tool_mode, tool_section_rules

_TEXT = "TEXT: /(?s:.+)/\n"


def response_schema(body: dict) -> dict | None:
    """The JSON schema that `response_format` asks for (None: free text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ParamError("response_format must be {type: text | json_object | json_schema}", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise ParamError("response_format.json_schema must be {name, schema: {...}, strict}", "response_format")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ParamError("response_format.json_schema.name must be a string", "response_format")
    schema = spec.get("schema", {})
    return {} if schema is True else schema


def thinking_enabled(body: dict, tokenizer) -> bool:
    """Whether the reply may hold a <think> block: the template writes them, and the request did not
    turn reasoning off with chat_template_kwargs {"thinking": false} on a template that reads that
    variable (K2.5). A template that does not read it ignores it (no error), as the template does."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ParamError("chat_template_kwargs must be an object", "chat_template_kwargs")
    if "<think>" not in tokenizer.chat_template:
        return False
    return not (kwargs.get("thinking") is False and "thinking" in getattr(tokenizer, "template_vars", ()))


def _think_rules(mode: str | None) -> tuple[str, str]:
    """(prefix of the start rule, rules) for no think block, an optional one, or one already open."""
    if mode is None:
        return "", ""
    if mode == "open":
        return "think ", "think: THINK_TEXT? </think>\nTHINK_TEXT: /(?s:.+)/\n"
    return "think? ", "think: <think> THINK_TEXT? </think>\nTHINK_TEXT: /(?s:.+)/\n"


def chat_grammar(schema: dict | None, tools: list[dict], mode: str, only: str | None, parallel: bool,
                 first_idx: int, think: str | None) -> str | None:
    """The Lark grammar for one chat reply (None: unconstrained)."""
    if not tools and schema is None:
        return None
    prefix, rules = _think_rules(think)
    if schema is not None:
        rules += json_schema_rule(schema)
    if mode in ("auto", "required", "named") and tools:
        rules += tool_section_rules(tools, only, parallel, first_idx)
    body = {("none", False): "TEXT?", ("none", True): "json", ("auto", False): "TEXT? section?",
            ("auto", True): "(json | section)"}.get((mode, schema is not None), "section")
    if "TEXT" in body:
        rules += _TEXT
    return f"start: {prefix}{body}\n{rules}"


def make_constraint(tokenizer, lark: str | None, max_tokens: int, param: str):
    """A fresh GrammarConstraint for `lark` (None → None); 400 when it cannot compile or fit."""
    if lark is None:
        return None
    try:
        constraint = compile_grammar(tokenizer, lark)()
    except GrammarError as e:
        raise ParamError(str(e), param) from None
    need = constraint.min_tokens()
    if need is not None and need > max_tokens:
        raise ParamError(f"max_tokens ({max_tokens}) is too small for the requested format: "
                         f"the shortest valid reply takes {need} tokens", "max_tokens")
    return constraint


def completion_grammar(body: dict) -> tuple[str | None, str]:
    """(Lark grammar, the field it came from) for /v1/completions."""
    grammar = body.get("grammar")
    schema = response_schema(body)
    if grammar is not None and schema is not None:
        raise ParamError("give either grammar or response_format, not both", "grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ParamError("grammar must be a non-empty Lark grammar (llguidance syntax)", "grammar")
        return grammar, "grammar"
    try:
        return (None if schema is None else "start: json\n" + json_schema_rule(schema)), "response_format"
    except GrammarError as e:
        raise ParamError(str(e), "response_format") from None


def chat_constraint(body: dict, tokenizer, in_think: bool, first_idx: int, max_tokens: int):
    """The constraint for one chat request (None: free text); tools are already shape-checked."""
    tools = body.get("tools") or []
    mode, only = tool_mode(body, tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ParamError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    schema = response_schema(body)
    think = ("open" if in_think else "optional") if thinking_enabled(body, tokenizer) else None
    param = "response_format" if schema is not None else "tools"
    try:
        lark = chat_grammar(schema, tools, mode, only, parallel, first_idx, think)
    except GrammarError as e:  # a schema that does not compile: name the field that held it
        bad_format = schema is not None and not _compiles(schema)
        raise ParamError(str(e), "response_format" if bad_format else "tools") from None
    if lark is None and think is None and "<think>" in tokenizer.chat_template:  # thinking: false
        lark = "start: TEXT?\n" + _TEXT
    return make_constraint(tokenizer, lark, max_tokens, param)


def _compiles(schema: dict) -> bool:
    try:
        json_schema_rule(schema)
        return True
    except GrammarError:
        return False
