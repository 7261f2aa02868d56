"""Kimi K2 style Jinja chat templates written into the synthetic models' GGUF metadata."""

from __future__ import annotations

from hybrid_runtime.errors import InvalidRequestError

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# Macros shared by both variants. `content` may be a string or a list of {type: text} parts.
_MACROS = r"""
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro render_tool_calls(tool_calls) -%}
<|tool_calls_section_begin|>
{%- for call in tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- set call_id = call.id if (call.id is defined and call.id and call.id.startswith('functions.')) else 'functions.' ~ fn.name ~ ':' ~ loop.index0 -%}
<|tool_call_begin|>{{ call_id }}<|tool_call_argument_begin|>
{%- if fn.arguments is string -%}{{ fn.arguments }}{%- else -%}{{ fn.arguments | tojson }}{%- endif -%}
<|tool_call_end|>
{%- endfor -%}
<|tool_calls_section_end|>
{%- endmacro -%}
"""

_HEADER = r"""
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}
{%- if not messages or messages[0].role != 'system' -%}
<|im_system|>system<|im_middle|>""" + DEFAULT_SYSTEM_PROMPT + r"""<|im_end|>
{%- endif -%}
"""

_TURNS = r"""
{%- for message in messages -%}
{%- if message.role == 'system' -%}<|im_system|>system<|im_middle|>{{ render_content(message.content) }}<|im_end|>
{%- elif message.role == 'user' -%}<|im_user|>user<|im_middle|>{{ render_content(message.content) }}<|im_end|>
{%- elif message.role == 'tool' -%}<|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}
{{ render_content(message.content) }}<|im_end|>
{%- elif message.role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>
{%- if THINKING -%}{{ render_thinking(message, loop.index0 > last_user and thinking_on) }}{%- endif -%}
{{ render_content(message.content) }}
{%- if message.tool_calls -%}{{ render_tool_calls(message.tool_calls) }}{%- endif -%}
<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>GENERATION_THINK{%- endif -%}
"""

# K2-Thinking: the reasoning of turns after the last user message is kept, older turns get an
# empty <think></think>.
_THINKING = r"""
{%- macro render_thinking(message, keep) -%}
<think>{%- if keep and message.reasoning_content is defined and message.reasoning_content -%}{{ message.reasoning_content }}{%- endif -%}</think>
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- set last_user = ns.last_user -%}
"""

# K2.5: the `thinking` template variable switches reasoning. The generation prompt opens <think>
# (the model writes its reasoning, then </think>), or with thinking=false closes it at once with an
# empty <think></think>; the kept reasoning of the last turns is dropped then too.
_SWITCH = r"""
{%- set thinking_on = not (thinking is defined and thinking is false) -%}
"""
_GENERATION_THINK = "{%- if thinking_on -%}<think>{%- else -%}<think></think>{%- endif -%}"

TEMPLATE_STYLES = {False: "k2", True: "k2-thinking", "k2": "k2", "k2-thinking": "k2-thinking", "k2.5": "k2.5"}


def template_style(thinking: bool | str) -> str:
    """"k2" (Instruct), "k2-thinking" or "k2.5" for a `thinking` option (False, True or a style name)."""
    if isinstance(thinking, (bool, str)) and thinking in TEMPLATE_STYLES:
        return TEMPLATE_STYLES[thinking]
    raise InvalidRequestError(f"Unknown chat template {thinking!r}; choose k2, k2-thinking or k2.5.")


def kimi_k2_template(thinking: bool | str = False) -> str:
    """The Jinja chat template. `thinking`: False or "k2" (K2 Instruct), True or "k2-thinking"
    (<think> blocks in the history; the model opens its own), "k2.5" (the generation prompt opens
    <think>, and `thinking=false` in the template variables turns reasoning off)."""
    style = template_style(thinking)
    think = style != "k2"
    turns = _TURNS.replace("THINKING", "true" if think else "false")
    turns = turns.replace("GENERATION_THINK", _GENERATION_THINK if style == "k2.5" else "")
    prelude = _THINKING if think else "{%- set last_user = -1 -%}"
    prelude += _SWITCH if style == "k2.5" else "{%- set thinking_on = true -%}"
    return (_MACROS + prelude + _HEADER + turns).strip()
