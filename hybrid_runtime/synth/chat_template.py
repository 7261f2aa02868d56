"""Kimi K2 style Jinja chat templates written into the synthetic models' GGUF metadata."""

from __future__ import annotations

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
{%- if THINKING -%}{{ render_thinking(message, loop.index0 > last_user) }}{%- endif -%}
{{ render_content(message.content) }}
{%- if message.tool_calls -%}{{ render_tool_calls(message.tool_calls) }}{%- endif -%}
<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}
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


def kimi_k2_template(thinking: bool = False) -> str:
    """The Jinja chat template; `thinking` gives the K2-Thinking variant with <think> blocks."""
    turns = _TURNS.replace("THINKING", "true" if thinking else "false")
    prelude = _THINKING if thinking else "{%- set last_user = -1 -%}"
    return (_MACROS + prelude + _HEADER + turns).strip()
