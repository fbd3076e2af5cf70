"""Text and raw bytes of single tokens, as OpenAI's logprobs report them.

A byte-level BPE token (GPT-2, Llama 3, SmolLM2) may hold part of a UTF-8 character: decoded
alone it reads "\ufffd", and only its bytes say what it is. The bytes come from the token's string
through the tokenizer's own scheme (GPT-2's byte-to-character map, SentencePiece's <0xNN>
byte-fallback tokens and its "\u2581" for a space); for any other tokenizer, from its decoded text.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


class TokenText:
    """Text and raw bytes of single tokens, cached (a byte-level BPE token may be half a char)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind = _decoder_kind(tokenizer)
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def _compute(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        text = self.tokenizer.decode([token_id])
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.kind == "byte_level" and piece is not None:
            try:  # GPT-2's byte-to-character map, reversed: the exact bytes
                return text, tuple(self._byte_of[c] for c in piece)
            except KeyError:  # an added token outside the map: its text is its bytes
                pass
        if self.kind == "byte_fallback" and piece is not None and len(piece) == 6 \
                and piece.startswith("<0x") and piece.endswith(">"):
            return text, (int(piece[3:5], 16),)
        if self.kind in ("byte_fallback", "metaspace") and piece is not None:
            return text, tuple(piece.replace("\u2581", " ").encode("utf-8"))
        return text, tuple(text.encode("utf-8"))


class TokenSizes:
    """How much of a text each token stands for: its UTF-8 bytes, and the characters they begin.

    A special token (BOS, EOS) stands for nothing. The sizes are exact for byte-level BPE, whose
    tokens' bytes, end to end, are the text's; for others they are the tokens' own strings.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.text = TokenText(tokenizer)
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, tuple[int, int]] = {}

    def __call__(self, token_id: int) -> tuple[int, int]:
        """(UTF-8 bytes, characters begun): a byte that is no UTF-8 continuation begins one."""
        found = self._cache.get(token_id)
        if found is None:
            raw = () if token_id in self.special else self.text(token_id)[1]
            found = self._cache[token_id] = (len(raw), sum(b & 0xC0 != 0x80 for b in raw))
        return found

    def share(self, text: str, ids: Sequence[int],
              ranges: Iterable[tuple[int, int]]) -> tuple[int, int]:
        """(UTF-8 bytes, words) of `text` that the tokens ``ids[a:b]`` of `ranges` stand for.

        `ranges` are in order and do not overlap. A word (as ``str.split`` counts them) belongs
        to the token that holds its first character.
        """
        n_bytes = words = 0
        char = done = 0  # the character where token `done` begins
        for a, b in ranges:
            char += sum(self(t)[1] for t in ids[done:a])
            start = char
            for t in ids[a:b]:
                size, chars = self(t)
                n_bytes += size
                char += chars
            words += _words_begun(text, start, char)
            done = b
        return n_bytes, words


def _words_begun(text: str, start: int, end: int) -> int:
    """Words of `text` (whitespace-separated) whose first character is in ``[start, end)``."""
    return sum(1 for i in range(max(start, 0), min(end, len(text)))
               if not text[i].isspace() and (i == 0 or text[i - 1].isspace()))


def _decoder_kind(tokenizer: Any) -> str:
    """How token strings map to bytes: "byte_level", "byte_fallback", "metaspace" or "text"."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    except Exception:  # an unusual decoder: fall back to the decoded text
        return "text"
    found: set[str] = set()

    def walk(node: Any) -> None:  # a Sequence decoder nests the others
        if isinstance(node, dict):
            found.add(str(node.get("type")))
            if node.get("type") == "Replace" and "\u2581" in json.dumps(node, ensure_ascii=False):
                found.add("Metaspace")  # Llama's decoder: Replace("\u2581", " "), ByteFallback
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    for kind, name in (("byte_level", "ByteLevel"), ("byte_fallback", "ByteFallback"),
                       ("metaspace", "Metaspace")):
        if name in found:
            return kind
    return "text"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (openai/gpt-2, encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping
