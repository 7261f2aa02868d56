"""Streaming detokenization: never splits a UTF-8 character, holds back text that may begin a stop string."""

from __future__ import annotations

import codecs


class StreamDecoder:
    def __init__(self, token_bytes, stop: list[str] | None = None):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = list(stop or [])
        self._held = ""  # decoded text not yet released (could start a stop string)
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Feed one token; returns the newly released text ('' while held back)."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(self._token_bytes(token))
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for s in self._stop:
            i = self._held.find(s)
            if i >= 0:
                self.stopped = True
                out, self._held = self._held[:i], ""
                self.text += out
                return out
        keep = 0 if final else self._partial_stop_len()
        out = self._held[: len(self._held) - keep] if keep else self._held
        self._held = self._held[len(out) :]
        self.text += out
        return out

    def _partial_stop_len(self) -> int:
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), 0, -1):
                if self._held.endswith(s[:n]):
                    best = max(best, n)
                    break
        return best
