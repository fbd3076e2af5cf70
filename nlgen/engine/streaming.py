"""Text out as it comes: streamed text and stop strings.

Generated text is handed out piece by piece, never past a stop string and never half a UTF-8
character; a stop string counts only where it lies wholly in the generated text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """The text before the earliest stop string, or None when no stop string occurs."""
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return text[: min(positions)] if positions else None


class StopStrings:
    """``--stop`` on the generated text only, as OpenAI applies ``stop``.

    A stop string counts when it lies entirely within the completion (the new tokens decoded,
    special tokens skipped): text that begins in the prompt and ends in the output is no match.
    (transformers' ``stop_strings`` looks at the whole sequence, prompt included, so it is not
    used.) One object per batch: its criterion (:meth:`criteria`, for generate() and
    nlgen.engine.decode) tests every row after every new token and notes where each row first held a
    stop string; :meth:`end` then cuts the finished row there, whatever padding follows in the
    batch. So a prompt gets the same record alone and in a batch.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.first_hit: dict[int, int] = {}  # row -> new tokens when it first held a stop

    def cut(self, ids: list[int]) -> str | None:
        """The text of the completion ``ids`` before its earliest stop string, or None."""
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stops)

    def end(self, row: int, ids: list[int], *, noted: bool = True) -> tuple[int, str] | None:
        """(n, text) for row ``row`` whose new tokens are ``ids``: its first n tokens are the
        shortest prefix holding a stop string (the token that completes it included) and
        ``text`` is theirs before the earliest stop string; None when no prefix holds one.

        ``noted``: the criterion saw this row after each of its tokens (rows keep their place:
        greedy, sampling). Otherwise (beam search reorders rows) every prefix is decoded, as
        the criterion would: a prefix's text need not begin the longer text (an incomplete
        UTF-8 character, a tokenizer's clean-up of spaces).
        """
        if noted:
            n = self.first_hit.get(row)
            candidates = [] if n is None or n > len(ids) else [n]
        else:
            candidates = range(1, len(ids) + 1) if self.cut(ids) is not None else []
        for n in candidates:
            text = self.cut(ids[:n])
            if text is not None:
                return n, text
        return None

    def criteria(self, prompt_length: int, *, note: bool = True) -> Any:
        """A transformers stopping criterion: row r is done once its tokens after the first
        ``prompt_length`` (the padded prompt) hold a stop string. ``note``: rows keep their
        place from step to step (not beam search), so each row's first hit is noted."""
        return _criterion_class()(self, prompt_length, note)


@functools.cache
def _criterion_class() -> type:
    """Made on first use, so that importing this module imports no torch."""
    import torch
    from transformers import StoppingCriteria

    class CompletionStop(StoppingCriteria):
        def __init__(self, stops: StopStrings, prompt_length: int, note: bool) -> None:
            self.stops = stops
            self.prompt_length = prompt_length
            self.note = note

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            rows = input_ids[:, self.prompt_length:].tolist()  # (B, new)
            first_hit = self.stops.first_hit if self.note else {}
            done = []
            for r, ids in enumerate(rows):
                hit = r in first_hit or self.stops.cut(ids) is not None
                if hit and self.note:
                    first_hit.setdefault(r, len(ids))
                done.append(hit)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (B,)

    return CompletionStop


def completion_end(tokenizer: Any, ids: list[int], budget: int, eos_ids: set[int],
                   stops: StopStrings | None, row: int, *,
                   noted: bool) -> tuple[list[int], str, str]:
    """A row's completion tokens, text and finish reason, from its new tokens in the output.

    The completion ends at the first of: a stop string complete in its text (the token that
    completes it is counted, the string and what follows are cut), an EOS token (counted, as
    transformers keeps it, with its log-prob; its text is not the completion's, as in OpenAI's
    API: a ``-o eos_token_id`` that names an ordinary token ends the text before it), this
    prompt's own budget of new tokens. Whatever the batch appended after that (padding once a
    row is done, tokens past a shorter budget) is not the prompt's: alone and in a batch a
    prompt gets the same record.
    """
    ids = ids[:budget]
    finish = "length" if len(ids) >= budget else "time"
    text_ids = ids
    for pos, token in enumerate(ids):
        if token in eos_ids:
            ids, text_ids, finish = ids[: pos + 1], ids[:pos], "eos"
            break
    hit = stops.end(row, text_ids, noted=noted) if stops is not None else None
    if hit is not None:
        n, completion = hit
        return ids[:n], completion, "stop"
    return ids, tokenizer.decode(text_ids, skip_special_tokens=True), finish


class StopAwareStreamer:
    """A transformers streamer that hands out decoded text as it grows, never past a stop string.

    It decodes the whole completion at each step (cheap next to a forward pass) and holds back
    text that may still change: an incomplete UTF-8 character, or a tail that could be the start
    of a stop string.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[str], None],
                 eos: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.eos = set(eos)  # an EOS token ends the text; its own text is not shown
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""  # the text already emitted
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt itself
            self.prompt_seen = True
            return
        if self.stopped:
            return
        for token in value.reshape(-1).tolist():
            if token in self.eos:
                self.stopped = True
                break
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self._send(cut)
            self.stopped = True
            return
        # Trailing U+FFFD: bytes of a character not complete yet; they may still change.
        stable = len(text.rstrip("\ufffd"))
        safe = stable - self.hold  # a stop string may still begin in the last `hold` chars
        if safe > len(self.sent):
            self._send(text[:safe])

    def end(self) -> None:
        pass  # the final text is sent by finish(), which knows the exact cut

    def finish(self, completion: str) -> None:
        self._send(completion)

    def _send(self, text: str) -> None:
        # Text once printed cannot be taken back: only ever extend what was sent.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text

