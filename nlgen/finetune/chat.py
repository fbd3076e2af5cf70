"""Records to train on: conversations and prompt-completion pairs, checked, then masked.

The formats are those of trl's ``SFTTrainer`` and of OpenAI's fine-tuning:

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, with
  OpenAI's optional ``"weight": 0 | 1`` on assistant messages (0: context, not trained);
- ``{"prompt": ..., "completion": ...}``: two strings, or two lists of messages (trl's
  conversational prompt-completion: the completion holds the assistant's messages).

A record is checked as OpenAI's data checker does (an object, known keys and roles, non-empty
string contents, at least one assistant message to train on); a bad one raises ``BadRecord``
with the field that is wrong, and the caller names the line.

The loss mask comes from the chat template itself, never from ``{% generation %}`` tags (most
templates lack them, and transformers then returns an all-zero mask with a log warning). For
each trained assistant message the conversation is rendered up to it with the generation prompt
and through it; the tokens between the two are the reply. Both renderings must be prefixes of
the whole conversation, as text and as tokens, or the record is refused: its reply tokens
cannot be told apart. The reply is trained through its end-of-turn token (so that the model
learns to stop); what the template writes after that token (ChatML's newline) is not.

Core module: no torch, no printing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TEXT, MESSAGES, PROMPT_COMPLETION = "text", "messages", "prompt-completion"
INPUT_FORMATS = ("auto", TEXT, MESSAGES, PROMPT_COMPLETION)
RECORD_FORMATS = (MESSAGES, PROMPT_COMPLETION)
TRAIN_ON = ("completion", "all")  # completion: the replies (weight 1) / the completion only
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
IGNORE = -100  # the label that the loss skips


class BadRecord(Exception):
    """What is wrong with one record, naming the field (the caller adds the file and line)."""


@dataclass(frozen=True)
class Example:
    """One checked record: a conversation (``messages`` and which replies are trained) or a
    plain prompt and completion."""

    format: str  # MESSAGES or PROMPT_COMPLETION
    messages: tuple[dict[str, str], ...] = ()
    trained: tuple[bool, ...] = ()  # per message: an assistant reply the loss covers
    prompt: str | None = None  # plain prompt-completion
    completion: str | None = None


def detect_format(fields: dict[str, Any]) -> str:
    """A record's format by its keys, as trl tells them apart."""
    if "messages" in fields:
        return MESSAGES
    if "prompt" in fields and "completion" in fields:
        return PROMPT_COMPLETION
    return TEXT


def check_record(fields: dict[str, Any], fmt: str) -> Example:
    """The record as an Example, or BadRecord saying which field is wrong."""
    if fmt == MESSAGES:
        if "messages" not in fields:
            raise BadRecord(f"no 'messages' field (it has: {', '.join(fields) or 'nothing'})")
        messages, trained = _messages(fields["messages"], "messages")
        return _trainable(Example(MESSAGES, messages, trained))
    for key in ("prompt", "completion"):
        if key not in fields:
            raise BadRecord(f"no {key!r} field (it has: {', '.join(fields) or 'nothing'})")
    prompt, completion = fields["prompt"], fields["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise BadRecord("'completion' is empty")
        return Example(PROMPT_COMPLETION, prompt=prompt, completion=completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        before, _ = _messages(prompt, "prompt")
        after, trained = _messages(completion, "completion")
        for i, m in enumerate(after):
            if m["role"] != "assistant":
                raise BadRecord(f"completion[{i}].role is {m['role']!r}: a completion holds "
                                "the assistant's messages")
        return _trainable(Example(PROMPT_COMPLETION, before + after,
                                  (False,) * len(before) + trained))
    raise BadRecord("'prompt' and 'completion' must be two strings or two lists of messages")


def _messages(value: Any, where: str) -> tuple[tuple[dict[str, str], ...], tuple[bool, ...]]:
    if not isinstance(value, list):
        raise BadRecord(f"{where!r} is not a list of messages")
    if not value:
        raise BadRecord(f"{where!r} is empty")
    messages, trained = [], []
    for i, m in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"{here} is not an object")
        for key in ("role", "content"):
            if key not in m:
                raise BadRecord(f"{here} has no {key!r}")
        unknown = [k for k in m if k not in MESSAGE_KEYS]
        if unknown:
            raise BadRecord(f"{here} has an unknown key {unknown[0]!r} (known: "
                            f"{', '.join(MESSAGE_KEYS)})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRecord(f"{here}.role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(f"{here}.content is not a string")
        if not content.strip():
            raise BadRecord(f"{here}.content is empty")
        if "name" in m and not isinstance(m["name"], str):
            raise BadRecord(f"{here}.name is not a string")
        weight = m.get("weight", 1)
        if "weight" in m and role != "assistant":
            raise BadRecord(f"{here}.weight: only assistant messages have a weight")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise BadRecord(f"{here}.weight must be 0 or 1, not {weight!r}")
        messages.append({k: m[k] for k in ("role", "content", "name") if k in m})
        trained.append(role == "assistant" and weight == 1)
    return tuple(messages), tuple(trained)


def _trainable(example: Example) -> Example:
    if not any(example.trained):
        has = any(m["role"] == "assistant" for m in example.messages)
        raise BadRecord("every assistant message has weight 0: nothing to train on" if has
                        else "no assistant message to train on")
    return example


# ----------------------------------------------------------------------------- tokens


class Encoder:
    """Examples -> (input_ids, labels), labels IGNORE where the loss does not look."""

    def __init__(self, tokenizer: Any, train_on: str, end_of_turn: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.all = train_on == "all"
        self.end_of_turn = {t for t in end_of_turn if t is not None}
        if tokenizer.eos_token_id is not None:
            self.end_of_turn.add(tokenizer.eos_token_id)

    def __call__(self, example: Example) -> tuple[list[int], list[int]]:
        if example.prompt is not None:
            return self._plain(example.prompt, example.completion or "")
        return self._conversation(example.messages, example.trained)

    def _plain(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """The prompt's tokens as generate sees them, then the completion's, then EOS."""
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise BadRecord("the model's tokenizer has no EOS token to end a completion with")
        head = tok(prompt)["input_ids"]
        tail = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = head + tail
        return ids, list(ids) if self.all else [IGNORE] * len(head) + tail

    def _render(self, messages: Sequence[dict[str, str]], prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=prompt)
        except Exception as exc:  # jinja2's raise_exception, a template error, ...
            text = str(exc).strip().splitlines()
            raise BadRecord("the chat template refuses it: "
                            + (text[0] if text else type(exc).__name__)) from None

    def _conversation(self, messages: Sequence[dict[str, str]],
                      trained: Sequence[bool]) -> tuple[list[int], list[int]]:
        full = self._render(messages, prompt=False)
        replies = [i for i, t in enumerate(trained) if t]
        texts = [full]
        for i in replies:
            before, through = (self._render(messages[:i], prompt=True),
                               self._render(messages[:i + 1], prompt=False))
            if not (through.startswith(before) and full.startswith(through)):
                raise BadRecord(f"the chat template renders the conversation up to message {i} "
                                "differently from the whole: its reply cannot be told apart")
            texts += [before, through]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = encoded[0]
        if self.all:
            return ids, list(ids)
        labels = [IGNORE] * len(ids)
        for n, i in enumerate(replies):
            start, end = (len(x) for x in encoded[1 + 2 * n:3 + 2 * n])
            if ids[:start] != encoded[1 + 2 * n] or ids[:end] != encoded[2 + 2 * n]:
                raise BadRecord(f"message {i}'s reply does not begin or end on a token "
                                "boundary of the conversation")
            end = self._through_end_of_turn(ids, start, end)
            labels[start:end] = ids[start:end]
        return ids, labels

    def _through_end_of_turn(self, ids: list[int], start: int, end: int) -> int:
        """The end of a reply's span: just after its last end-of-turn token, if it has one
        (what the template writes after it is the turn's separator, not the reply)."""
        for j in range(end - 1, start - 1, -1):
            if ids[j] in self.end_of_turn:
                return j + 1
        return end


def end_of_turn_ids(model: Any) -> list[int]:
    """The tokens that end a reply: the generation config's EOS ids (the tokenizer's EOS is
    added by the Encoder)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
