"""OpenAI request bodies → validated `GenRequest`s. Every bad field raises ParamError (HTTP 400)."""

from __future__ import annotations

from dataclasses import dataclass, field
from hybrid_runtime.chat_format import prompt_opens_think
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.errors import ContextOverflowError, InvalidRequestError
from hybrid_runtime.server.constraints import chat_constraint, completion_grammar, make_constraint
from hybrid_runtime.server.tools import history_call_ids

_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_STOPS = 16


class ParamError(InvalidRequestError):
    """An invalid request field; `param` names it."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class UnknownModelError(InvalidRequestError):
    """The request names a model this server does not serve (HTTP 404)."""


@dataclass(slots=True)
class GenRequest:
    kind: str  # "chat" | "completion"
    prompt: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    parse_tools: bool = False
    in_think: bool = False  # the prompt opened a <think> block
    tools: list[dict] = field(default_factory=list)
    constraint: object = None  # engine.grammar.GrammarConstraint for structured output, or None


# -- field readers ---------------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ParamError(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ParamError(f"{name} must be between {lo} and {hi}, not {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ParamError(f"{name} must be true or false", name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    stops = [] if v is None else [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ParamError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > _MAX_STOPS:
        raise ParamError(f"stop takes at most {_MAX_STOPS} strings", "stop")
    return stops


def check_model(body: dict, served: str) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise ParamError("model must be a string", "model")
    if name != served:
        raise UnknownModelError(f"The model '{name}' does not exist; this server serves '{served}'")


def sampling_params(body: dict, n_prompt: int, n_ctx: int, top_logprobs: int | None) -> SamplingParams:
    if _number(body, "n", 1, integer=True) != 1:
        raise ParamError("only n=1 is supported", "n")
    max_tokens = _number(body, "max_completion_tokens", None, lo=1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, lo=1, integer=True)
    if max_tokens is not None and max_tokens > n_ctx:  # can never be met (OpenAI answers 400 too)
        raise ParamError(f"max_tokens {max_tokens} exceeds the context of {n_ctx} tokens", "max_tokens")
    room = n_ctx - n_prompt  # within the context: clamped to the room left after the prompt
    return SamplingParams(
        temperature=float(_number(body, "temperature", 0.8, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1)) or 1e-9,
        top_k=_number(body, "top_k", 0, 0, None, integer=True),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        repetition_penalty=float(_number(body, "repetition_penalty", _number(body, "repeat_penalty", 1.0, 0.01, 10), 0.01, 10)),
        seed=_number(body, "seed", None, integer=True),
        max_tokens=min(max_tokens, max(room, 1)) if max_tokens is not None else max(room, 1),
        stop=_stop(body),
        logprobs=top_logprobs,
        ignore_eos=_bool(body, "ignore_eos"),
    ).validate()


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ParamError("stream_options must be an object", "stream_options")
    return stream, bool(opts and _bool(opts, "include_usage"))


def _check_fits(prompt: list[int], n_ctx: int, param: str) -> None:
    if not prompt:
        raise ParamError("the prompt is empty", param)
    if len(prompt) > n_ctx:
        raise ContextOverflowError(
            f"This model's maximum context length is {n_ctx} tokens; the prompt has {len(prompt)} tokens")


# -- chat ------------------------------------------------------------------------------------------
def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ParamError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ParamError(f"messages[{i}] needs a role among {', '.join(_ROLES)}", f"messages[{i}]")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise ParamError(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        out.append(m)
    return out


def _tools(body: dict) -> tuple[list[dict], bool]:
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise ParamError("tools must be a list of {type: function, function: {name, ...}}", "tools")
    choice = body.get("tool_choice", "auto")
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in names:
            raise ParamError("tool_choice names a function that is not in tools", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise ParamError("tool_choice must be none, auto, required or {type: function, function: {name}}", "tool_choice")
    if choice == "none":
        return [], False
    return tools, bool(tools)


def parse_chat(body: dict, tokenizer, n_ctx: int) -> GenRequest:
    messages, first_idx = history_call_ids(_messages(body))
    tools, parse_tools = _tools(body)
    stream, usage = _stream_flags(body)
    want_lp = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    kwargs = _template_kwargs(body)
    prompt = tokenizer.encode_chat(messages, tools or None, add_generation_prompt=True, template_kwargs=kwargs)
    _check_fits(prompt, n_ctx, "messages")
    in_think = prompt_opens_think(tokenizer.render_chat(messages, tools or None, template_kwargs=kwargs)[-64:])
    params = sampling_params(body, len(prompt), n_ctx, top if want_lp else None)
    constraint = chat_constraint(body, tokenizer, in_think, first_idx, params.max_tokens)
    return GenRequest("chat", prompt, params, stream, usage, want_lp, parse_tools, in_think, tools, constraint)


def _template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs` (e.g. {"thinking": false}) as extra template variables."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise ParamError("chat_template_kwargs must be an object", "chat_template_kwargs")
    if kw.get("thinking") is not None and not isinstance(kw["thinking"], bool):
        raise ParamError("chat_template_kwargs.thinking must be true or false", "chat_template_kwargs")
    return kw


# -- completions -----------------------------------------------------------------------------------
def _completion_prompt(body: dict, tokenizer) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return tokenizer.tokenize(p, special=False)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < tokenizer.n_vocab for t in p):
            raise ParamError("prompt holds a token id outside the vocabulary", "prompt")
        return list(p)
    raise ParamError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def parse_completion(body: dict, tokenizer, n_ctx: int) -> GenRequest:
    prompt = _completion_prompt(body, tokenizer)
    _check_fits(prompt, n_ctx, "prompt")
    stream, usage = _stream_flags(body)
    top = _number(body, "logprobs", None, 0, 20, integer=True)
    if _bool(body, "echo"):
        raise ParamError("echo is not supported", "echo")
    params = sampling_params(body, len(prompt), n_ctx, top)
    lark, field_name = completion_grammar(body)
    constraint = make_constraint(tokenizer, lark, params.max_tokens, field_name)
    return GenRequest("completion", prompt, params, stream, usage, top is not None, constraint=constraint)

