"""Tokenizer and chat template from the GGUF itself.

The vocabulary runs in llama.cpp (`Llama(vocab_only=True)`, ~10 ms to load). The chat template is
rendered by Jinja in an immutable sandbox (an unsandboxed one gave code execution from a model
file, CVE-2024-34359). Message text is tokenized with special=False, so `<|im_end|>` typed by a
user stays text; only the template's own markup becomes special tokens.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybrid_runtime.errors import InvalidRequestError, ModelFormatError
from hybrid_runtime.util import quiet_stderr
from hybrid_runtime.weights.gguf_file import GGUFModelFile

_EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_EOG_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")

_RESERVED_VARS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _raise(msg: str):
    raise TemplateError(msg)


def _flatten_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise InvalidRequestError("message content must be a string or a list of text parts")


class Tokenizer:
    def __init__(self, gf: GGUFModelFile):
        from llama_cpp import Llama

        if "tokenizer.ggml.tokens" not in gf.metadata:
            raise ModelFormatError(f"{gf.path}: the file has no tokenizer (tokenizer.ggml.tokens)")
        try:
            with quiet_stderr():
                self._llama = Llama(model_path=str(gf.parts[0]), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ModelFormatError(f"{gf.path}: llama.cpp could not load the vocabulary ({e})") from None
        tokens: list[str] = gf.metadata["tokenizer.ggml.tokens"]
        self.n_vocab = len(tokens)
        self.bos_id = gf.metadata.get("tokenizer.ggml.bos_token_id")
        self.add_bos = bool(gf.metadata.get("tokenizer.ggml.add_bos_token", False))
        eog = {gf.metadata[k] for k in _EOG_KEYS if k in gf.metadata}
        eog |= {i for i, t in enumerate(tokens) if t in _EOG_NAMES}
        self.eog_ids = frozenset(int(i) for i in eog)
        self.token_strings = tokens
        self.chat_template = gf.metadata.get("tokenizer.chat_template") or DEFAULT_TEMPLATE
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._env.globals["raise_exception"] = _raise
        self._env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)
        try:
            self._template = self._env.from_string(self.chat_template)
            # the variables the template reads but never sets (e.g. K2.5's `thinking` switch)
            self.template_vars = frozenset(meta.find_undeclared_variables(self._env.parse(self.chat_template)))
        except TemplateError as e:
            raise ModelFormatError(f"{gf.path}: the chat template does not parse ({e})") from None

    # -- plain text ---------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = False, add_bos: bool | None = None) -> list[int]:
        bos = self.add_bos if add_bos is None else add_bos
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (special tokens as their text)."""
        return self._llama.detokenize([token_id], special=True)

    def llama_vocab(self):
        """llama.cpp's vocabulary handle (for the grammar library's tokenizer view)."""
        return self._llama._model.vocab

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self._llama.detokenize(list(ids), special=special).decode("utf-8", errors="replace")

    # -- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
        return self._render(messages, tools, add_generation_prompt, None, template_kwargs)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> list[int]:
        """Template markup as special tokens, message text as plain text.
        `template_kwargs`: extra template variables (e.g. thinking=False), never the reserved ones."""
        texts: dict[str, str] = {}
        rendered = self._render(messages, tools, add_generation_prompt, texts, template_kwargs)
        ids: list[int] = []
        if self.add_bos and self.bos_id is not None:
            ids.append(int(self.bos_id))
        for i, piece in enumerate(re.split(r"(\x00[0-9a-f]{32}\x00)", rendered)):
            if not piece:
                continue
            if i % 2:  # a sentinel: the message text it stands for
                ids += self.tokenize(texts[piece], special=False, add_bos=False)
            else:
                ids += self.tokenize(piece, special=True, add_bos=False)
        return ids

    def _render(self, messages, tools, add_generation_prompt, texts: dict[str, str] | None,
                template_kwargs: dict | None = None) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError("messages must be a list of objects")
        msgs = []
        for m in messages:
            m = dict(m)
            content = _flatten_content(m.get("content"))
            if content and texts is not None:
                key = f"\x00{uuid.uuid4().hex}\x00"
                texts[key] = content
                content = key
            m["content"] = content
            msgs.append(m)
        # extra variables never replace the reserved ones nor the environment's globals (namespace, range…)
        extra = {k: v for k, v in (template_kwargs or {}).items()
                 if k not in _RESERVED_VARS and k not in self._env.globals}
        try:
            return self._template.render(
                **extra, messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt,
                bos_token=self._piece(self.bos_id), eos_token="",
            )
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            # request data the template cannot take (a kwarg of the wrong type, a message field…)
            raise InvalidRequestError(f"the chat template failed on these messages: {e}") from None

    def _piece(self, token_id) -> str:
        if token_id is None or not 0 <= int(token_id) < self.n_vocab:
            return ""
        return self.token_strings[int(token_id)]

