"""Engine Steps → OpenAI response objects and stream chunks (chat.completion(.chunk), text_completion)."""

from __future__ import annotations

import json
import time
import uuid

from hybrid_runtime.chat_format import StreamParser
from hybrid_runtime.engine.generate import Stats, Step
from hybrid_runtime.server.protocol import GenRequest
from hybrid_runtime.server.tools import ToolCallDeltas


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(stats: Stats | None) -> dict:
    s = stats or Stats()
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


class Output:
    """Turns one request's Steps into chunks (streaming) and a whole response (not streaming)."""

    def __init__(self, req: GenRequest, tokenizer, model_name: str):
        self.req, self.tok, self.model = req, tokenizer, model_name
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.parser = StreamParser(in_think=req.in_think, parse_tools=req.parse_tools)
        self.content, self.reasoning, self.text = "", "", ""
        self._call_deltas = ToolCallDeltas()
        self._lp_pending: list[tuple[int, float, list]] = []
        self._lp_all: list[tuple[int, float, list]] = []

    # -- chunks -------------------------------------------------------------------------------------
    def _chunk(self, choice: dict | None) -> dict:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [] if choice is None else [choice]}
        if self.req.include_usage:
            obj["usage"] = None
        return obj

    def _choice(self, delta_or_text, finish: str | None = None, logprobs=None) -> dict:
        key = "delta" if self.chat else "text"
        return {"index": 0, key: delta_or_text, "logprobs": logprobs, "finish_reason": finish}

    def first_chunks(self) -> list[dict]:
        return [self._chunk(self._choice({"role": "assistant", "content": ""}))] if self.chat else []

    def on_step(self, step: Step) -> list[dict]:
        if step.token is not None and step.logprob is not None:
            entry = (step.token, step.logprob, step.top_logprobs or [])
            self._lp_pending.append(entry)
            self._lp_all.append(entry)
        if not self.chat:
            self.text += step.text
            return [self._text_chunk(step.text)] if step.text else []
        return self._chat_chunks(self.parser.feed(step.text))

    def final_chunks(self, finish: str, stats: Stats | None) -> list[dict]:
        out = self._chat_chunks(self.parser.finish()) if self.chat else []
        if self._lp_pending and self.req.logprobs:  # tokens that released no text (a marker, a held tail)
            out.append(self._chunk(self._choice({"content": ""}, logprobs=self._take_logprobs())) if self.chat
                       else self._text_chunk(""))
        out.append(self._chunk(self._choice({} if self.chat else "", self.finish_reason(finish))))
        if self.req.include_usage:
            out.append({**self._chunk(None), "usage": usage(stats)})
        return out

    def _text_chunk(self, text: str) -> dict:
        return self._chunk(self._choice(text, logprobs=self._take_logprobs()))

    def _chat_chunks(self, events: list[tuple[str, str]]) -> list[dict]:
        out = []
        for kind, text in events:
            key = "content" if kind == "content" else "reasoning_content"
            if kind == "content":
                self.content += text
            else:
                self.reasoning += text
            out.append(self._chunk(self._choice({key: text}, logprobs=self._take_logprobs())))
        for delta in self._call_deltas.deltas(self.parser):
            out.append(self._chunk(self._choice({"tool_calls": [delta]})))
        return out

    # -- logprobs -----------------------------------------------------------------------------------
    def _take_logprobs(self):
        if not self.req.logprobs or not self._lp_pending:
            return None
        entries, self._lp_pending = self._lp_pending, []
        return self._format_logprobs(entries)

    def _piece(self, token: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(token)
        return b.decode("utf-8", errors="replace"), list(b)

    def _format_logprobs(self, entries) -> dict:
        if self.chat:
            content = []
            for token, lp, top in entries:
                text, b = self._piece(token)
                alts = [dict(zip(("token", "bytes"), self._piece(t)), logprob=v) for t, v in top]
                content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": alts})
            return {"content": content}
        texts = [self._piece(t)[0] for t, _, _ in entries]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._piece(t)[0]: v for t, v in top} for _, _, top in entries],
                "text_offset": [len(self.text) - sum(map(len, texts[i:])) for i in range(len(texts))]}

    # -- whole response -------------------------------------------------------------------------------
    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.parser.tool_calls else finish

    def response(self, finish: str, stats: Stats | None) -> dict:
        if self.chat:
            self._chat_chunks(self.parser.finish())
        lp = self._format_logprobs(self._lp_all) if self.req.logprobs else None
        if self.chat:
            msg = {"role": "assistant", "content": self.content if (self.content or not self.parser.tool_calls) else None}
            if self.reasoning:
                msg["reasoning_content"] = self.reasoning
            if self.parser.tool_calls:
                msg["tool_calls"] = [c.to_openai() for c in self.parser.tool_calls]
            choice = {"index": 0, "message": msg, "logprobs": lp, "finish_reason": self.finish_reason(finish)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(stats)}
