"""A small byte-level BPE vocabulary (GPT-2 byte mapping) for the synthetic models.

256 byte tokens, merges learned deterministically from `corpus.CORPUS`, then the Kimi K2
special tokens at the end of the vocabulary (as in the real model).
"""

from __future__ import annotations

import functools
import heapq
import re
from collections import Counter
from dataclasses import dataclass

import gguf

from hybrid_runtime.synth.corpus import CORPUS

VOCAB_SIZE = 2048
SPECIAL_TOKENS = (
    "[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
    "<|im_middle|>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
    "<think>", "</think>",
)
# An ASCII approximation of Kimi K2's pre-tokenizer: merges never cross these pieces.
_PRETOKEN = re.compile(
    r"[^\r\n\w]?[A-Za-z]+(?:'s|'t|'re|'ve|'m|'ll|'d)?|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True, slots=True)
class Vocab:
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]

    def token_id(self, text: str) -> int:
        return self.tokens.index(text)


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _words(text: str) -> Counter[tuple[str, ...]]:
    b2u = byte_to_unicode()
    return Counter(tuple(b2u[b] for b in piece.encode()) for piece in _PRETOKEN.findall(text))


def _pairs(word: list[str]) -> Counter[tuple[str, str]]:
    return Counter(zip(word, word[1:]))


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent pair (ties: the smallest pair)."""
    counted = sorted(_words(text).items())
    words = [list(w) for w, _ in counted]
    freq = [n for _, n in counted]
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, word in enumerate(words):
        for pair, k in _pairs(word).items():
            counts[pair] += k * freq[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue                                    # stale heap entry
        merges.append(pair)
        for i in sorted(where.pop(pair, ())):
            before = _pairs(words[i])
            words[i] = _merge_word(words[i], pair)
            after = _pairs(words[i])
            for q in before.keys() | after.keys():
                delta = (after[q] - before[q]) * freq[i]
                if delta:
                    counts[q] += delta
                    heapq.heappush(heap, (-counts[q], q))
                if after[q]:
                    where.setdefault(q, set()).add(i)
        counts.pop(pair, None)
    return merges


def training_text() -> str:
    """The corpus plus capitalised, bare, upper-case forms of its words and the numbers 0-999."""
    words = sorted(set(re.findall(r"[A-Za-z]+", CORPUS)))
    return "\n".join([
        CORPUS,
        " ".join(w.capitalize() for w in words),
        "\n".join(words),
        " ".join(w.upper() for w in words),
        " ".join(str(i) for i in range(1000)),
    ])


@functools.cache
def build_vocab(size: int = VOCAB_SIZE) -> Vocab:
    """The synthetic vocabulary: bytes, learned merges, [PAD] fill up to `size`, then the special tokens."""
    if size < VOCAB_SIZE:
        raise ValueError(f"the synthetic vocabulary needs at least {VOCAB_SIZE} tokens, not {size}")
    return vocab_from_merges(learn_merges(training_text(), VOCAB_SIZE - 256 - len(SPECIAL_TOKENS)), size)


def learn_vocab(text: str, size: int) -> Vocab:
    """A vocabulary of exactly `size` tokens whose merges are learned from `text`."""
    return vocab_from_merges(learn_merges(text, size - 256 - len(SPECIAL_TOKENS)), size)


def vocab_from_merges(merges: list[tuple[str, str]], size: int) -> Vocab:
    """Bytes, the merged tokens in merge order, [PAD] fill up to `size`, then the special tokens."""
    tokens = [byte_to_unicode()[b] for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    if len(tokens) > size - len(SPECIAL_TOKENS):
        raise ValueError(f"{len(merges)} merges do not fit a vocabulary of {size} tokens")
    while len(tokens) < size - len(SPECIAL_TOKENS):
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
    tokens += SPECIAL_TOKENS
    types += [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return Vocab(tuple(tokens), tuple(int(t) for t in types), tuple(f"{a} {b}" for a, b in merges))


def add_tokenizer(writer: gguf.GGUFWriter, chat_template: str | None, size: int = VOCAB_SIZE,
                  vocab: Vocab | None = None) -> None:
    """Write the tokenizer.ggml.* keys (and the chat template): `vocab`, or the synthetic vocabulary."""
    v = vocab or build_vocab(size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("kimi-k2")
    writer.add_token_list(list(v.tokens))
    writer.add_token_types(list(v.types))
    writer.add_token_merges(list(v.merges))
    writer.add_bos_token_id(v.token_id("[BOS]"))
    writer.add_eos_token_id(v.token_id("[EOS]"))
    writer.add_eot_token_id(v.token_id("<|im_end|>"))
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
