"""Continuous batching: requests join the running batch as slots free up (``nlgen serve``).

An :class:`Engine` owns a loaded model and a worker thread. :meth:`Engine.submit` checks a
request at once (the same checks as ``nlgen generate``: a bad prompt or option raises there, in
the caller's thread) and queues it; the worker gives each of its sequences a slot of the lean
forward's cache (nlgen.engine.slots) as soon as one is free, reads its prompt, then decodes every
live sequence together, one token a step, each with its own Chooser (nlgen.engine.choosing:
generate()'s processors and warpers, the seeded draw). A sequence that ends frees its slot for
the next one at the next step; a cancelled ticket (the client went) frees its slots there too.

Each sequence's text goes out as it grows (:class:`Delta`: never past a stop string, never half
a character, with the token's log-probs when asked), then its record (:class:`Finished`, the
same :class:`~nlgen.engine.generation.Generation` that ``nlgen generate`` writes). A request
with ``seed`` draws what ``nlgen generate --seed`` draws for a first prompt, so a served answer
and a command-line one agree (in float32). Events are sent from the worker thread.

A model without a lean forward, or a request only transformers' generate() can run (beam search,
``max_time``, a ``-o`` field the loop lacks), is run whole by generate() in the worker, one
request at a time: the same answers, without the batching.

torch is imported by the worker, not at import.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nlgen.engine import decode, sampling
from nlgen.engine.generation import Generation, Prepared, eos_ids, generate_indexed, prepare
from nlgen.engine.options import GenerationOptions
from nlgen.engine.streaming import StopAwareStreamer, StopStrings, completion_end
from nlgen.errors import NlgenError
from nlgen.inputs import Prompt
from nlgen.score.likelihood import TokenLogprob

log = logging.getLogger("nlgen")

MAX_CACHE = 2048  # positions per slot, unless asked: a model's whole context may be 8k or more


@dataclass(frozen=True)
class Delta:
    """More text of sequence ``sequence`` (possibly empty when only ``logprobs`` come), and the
    log-probs of the tokens that made it (empty unless the request asked for them)."""

    sequence: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """Sequence ``generation.sequence`` is complete: its record, as ``nlgen generate`` gives it."""

    generation: Generation


@dataclass(frozen=True)
class Failed:
    """The ticket ends without its answer (the engine stops, or generation raised)."""

    error: str


class Busy(NlgenError):
    """The queue is full: the request is refused at once."""


class Closed(NlgenError):
    """The engine stops and takes nothing more."""


class Ticket:
    """One request on the engine: its prompt, options and the sequences still to finish."""

    def __init__(self, engine: Engine, prepared: Prepared, opts: GenerationOptions,
                 config: Any, lean: bool, on_event: Callable[[Any], None]) -> None:
        self.engine = engine
        self.prepared = prepared
        self.opts = opts
        self.config = config  # resolved (nlgen.engine.sampling.resolve_config)
        self.lean = lean  # decoded in the batch; else run whole by generate()
        self.on_event = on_event
        self.waiting = list(range(opts.num_return_sequences))  # sequences without a slot yet
        self.running = 0  # sequences in a slot
        self.cancelled = False

    def cancel(self) -> None:
        """Free the ticket's slots at the next step; nothing more is sent."""
        self.engine._cancel(self)


class _Sequence:
    """One sequence in a slot: its tokens, how it chooses the next, its text so far."""

    def __init__(self, engine: Engine, ticket: Ticket, sequence: int, slot: int) -> None:
        from nlgen.engine.choosing import Chooser

        opts, prepared = ticket.opts, ticket.prepared
        self.engine = engine
        self.ticket = ticket
        self.sequence = sequence
        self.slot = slot
        seed = None if opts.seed is None else sampling.row_seed(opts.seed, 0, sequence)
        self.chooser = Chooser(ticket.config, len(prepared.ids), seed)
        self.eos = eos_ids(ticket.config, engine.lm.tokenizer)
        self.tokens = list(prepared.ids)
        self.new: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.stops = StopStrings(engine.lm.tokenizer, opts.stop) if opts.stop else None
        self.text: list[str] = []  # what the streamer let out since the last Delta
        self.streamer = StopAwareStreamer(engine.lm.tokenizer, opts.stop, self.text.append,
                                          self.eos)
        self.streamer.prompt_seen = True

    def advance(self, scores: Any) -> bool:
        """Choose the next token from its logits ``scores`` (1, V) float32 and send the text it
        adds; True when the sequence is finished (its record sent)."""
        import torch

        k = self.ticket.opts.logprobs
        token = self.chooser(self.tokens, scores)
        lp = () if k is None else (self.engine.logprob(scores, token, k),)
        self.logprobs.extend(lp)
        self.tokens.append(token)
        self.new.append(token)
        self.streamer.put(torch.tensor([token]))
        done = token in self.eos or len(self.new) >= self.ticket.prepared.max_new
        if self.stops is not None and not done and self.stops.cut(self.new) is not None:
            self.stops.first_hit[0] = len(self.new)
            done = True
        self._send(lp)
        if done:
            self._finish()
        return done

    def _send(self, logprobs: tuple[TokenLogprob, ...]) -> None:
        text = "".join(self.text)
        self.text.clear()
        if text or logprobs:
            self.ticket.on_event(Delta(self.sequence, text, logprobs))

    def _finish(self) -> None:
        prepared, tokenizer = self.ticket.prepared, self.engine.lm.tokenizer
        ids, completion, finish = completion_end(tokenizer, self.new, prepared.max_new,
                                                 self.eos, self.stops, 0, noted=True)
        self.streamer.finish(completion)
        self._send(())
        asked = self.ticket.opts.logprobs is not None
        prompt = prepared.prompt
        self.ticket.on_event(Finished(Generation(
            0, self.sequence, prompt.text, completion, len(prepared.ids), len(ids), finish,
            prompt.line, logprobs=tuple(self.logprobs[:len(ids)]) if asked else None,
            seen=prepared.seen)))


class Engine:
    """A loaded model decoding many requests together (see the module docstring).

    ``slots``: sequences decoded together; ``max_queue``: requests that may wait for a slot
    (beyond: :class:`Busy`); ``max_len``: positions of each slot's cache, prompt and new tokens
    (default: the model's context, at most 2048): the context a request is checked against
    (:attr:`context`).
    """

    def __init__(self, lm: Any, slots: int = 8, max_queue: int = 64,
                 max_len: int | None = None) -> None:
        self.lm = lm
        self.slot_count = slots
        self.max_queue = max_queue
        self.context = min(max_len or MAX_CACHE, lm.context_length)
        self.lean = decode.lean_reason(lm) is None
        self.slots: Any = None  # nlgen.engine.slots.Slots: every slot's cache, made once
        if self.lean:
            from nlgen.engine.slots import Slots

            self.slots = Slots(lm, slots, self.context)
        self.live: dict[int, _Sequence] = {}  # slot -> its sequence
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.closing = False  # no more submissions
        self.stopped = False  # the worker ends at its next turn
        self.starting = False  # the worker holds sequences that are in no list yet
        self.cond = threading.Condition()
        self._text: Any = None  # nlgen.score.token_bytes.TokenText, made on first use
        self.thread = threading.Thread(target=self._work, name="nlgen-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the caller's side

    def submit(self, prompt: Prompt, opts: GenerationOptions,
               on_event: Callable[[Any], None]) -> Ticket:
        """Check and queue a request; its events go to ``on_event`` (from the worker thread).

        Raises at once: UsageError or InputError for the request itself (as ``nlgen generate``
        would), :class:`Busy` when the queue is full, :class:`Closed` when the engine stops."""
        prepared = prepare(self.lm, 0, prompt, opts, context=self.context)
        config = sampling.resolve_config(self.lm.generation_config,
                                         sampling.build_generation_config(self.lm, opts))
        lean = (self.lean and opts.engine != "transformers"
                and decode._request_reason(config) is None)
        ticket = Ticket(self, prepared, opts, config, lean, on_event)
        with self.cond:
            if self.closing:
                raise Closed("the engine is stopping")
            sequences = sum(len(t.waiting) for t in self.waiting) + len(self.live)
            if len(self.waiting) >= self.max_queue and sequences >= self.slot_count:
                raise Busy(f"{len(self.waiting)} requests wait for a slot (--max-queue "
                           f"{self.max_queue})")
            self.waiting.append(ticket)
            self.cond.notify_all()
        return ticket

    def _cancel(self, ticket: Ticket) -> None:
        with self.cond:
            ticket.cancelled = True
            self.cond.notify_all()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take nothing more; let the requests in hand finish (``drain``, for at most
        ``timeout`` seconds) or not, then cancel what is left (each gets :class:`Failed`) and
        join the worker."""
        with self.cond:
            self.closing = True
            if drain:
                self.cond.wait_for(self._idle, timeout)
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()

    def _idle(self) -> bool:
        return not self.waiting and not self.live and not self.starting

    def logprob(self, scores: Any, token: int, k: int) -> TokenLogprob:
        """The log-prob of ``token`` under raw logits ``scores`` (1, V), and the top ``k``."""
        from nlgen.engine import token_logprobs
        from nlgen.score.token_bytes import TokenText

        if self._text is None:
            self._text = TokenText(self.lm.tokenizer)
        return token_logprobs.one(self._text, scores, token, k)

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        import torch

        with torch.inference_mode():
            while self._turn():
                pass
        with self.cond:  # stopped: whatever is left is told so
            left = {s.ticket for s in self.live.values()} | set(self.waiting)
            self.live.clear()
            self.waiting.clear()
        for ticket in left:
            if not ticket.cancelled:
                ticket.on_event(Failed("the engine stopped before the answer was complete"))

    def _turn(self) -> bool:
        """One step of the worker: free, admit, decode. False when it is to stop."""
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.waiting or self.live)
            if self.stopped:
                return False
            for slot in [s for s, seq in self.live.items() if seq.ticket.cancelled]:
                del self.live[slot]
            self.waiting = collections.deque(t for t in self.waiting if not t.cancelled)
            whole = self.waiting.popleft() if self.waiting and not self.waiting[0].lean \
                and not self.live else None
            admitted = [] if whole else self._admit()
            self.starting = True
        try:
            if whole is not None:
                self._run_whole(whole)
            else:
                self._start(admitted)
                self._step()
        except Exception as exc:  # every ticket in hand fails; the engine goes on
            log.exception("generation failed")
            self._fail_all(f"{type(exc).__name__}: {exc}", [t for t, _, _ in admitted])
        finally:
            with self.cond:
                self.starting = False
                self.cond.notify_all()  # close() may be waiting for the idle engine
        return True

    def _admit(self) -> list[tuple[Ticket, int, int]]:
        """(ticket, sequence, slot) for the waiting sequences that get a free slot now, in
        arrival order (called with the lock held)."""
        admitted = []
        free = [s for s in range(self.slot_count) if s not in self.live]
        while self.waiting and free and self.waiting[0].lean:
            ticket = self.waiting[0]
            while ticket.waiting and free:
                admitted.append((ticket, ticket.waiting.pop(0), free.pop(0)))
                ticket.running += 1
            if not ticket.waiting:
                self.waiting.popleft()
        return admitted

    def _start(self, admitted: list[tuple[Ticket, int, int]]) -> None:
        """Read the admitted sequences' prompts into their slots (a ticket's prompt once, its
        other sequences copy it) and choose each one's first token."""
        read: dict[Ticket, tuple[int, Any]] = {}  # ticket -> (slot, logits) of its prompt
        for ticket, sequence, slot in admitted:
            if ticket in read:
                first, logits = read[ticket]
                self.slots.copy(first, slot)
            else:
                logits = self.slots.prefill(slot, ticket.prepared.ids)
                read[ticket] = (slot, logits)
            seq = _Sequence(self, ticket, sequence, slot)
            if not seq.advance(logits):
                with self.cond:
                    self.live[slot] = seq
            else:
                self._ended(ticket)

    def _step(self) -> None:
        """One new token for every live sequence."""
        with self.cond:
            live = dict(self.live)
        if not live:
            return
        scores = self.slots.step({slot: seq.tokens[-1] for slot, seq in live.items()})
        for slot, seq in live.items():
            if seq.ticket.cancelled:
                continue
            if seq.advance(scores[slot:slot + 1]):
                with self.cond:
                    self.live.pop(slot, None)
                self._ended(seq.ticket)

    def _ended(self, ticket: Ticket) -> None:
        with self.cond:
            ticket.running -= 1
            self.cond.notify_all()

    def _fail_all(self, error: str, admitted: list[Ticket]) -> None:
        with self.cond:
            tickets = {s.ticket for s in self.live.values()} | set(admitted)
            self.live.clear()
            self.cond.notify_all()
        for ticket in tickets:
            ticket.cancelled = True
            ticket.on_event(Failed(error))

    def _run_whole(self, ticket: Ticket) -> None:
        """A request the batch cannot take, by generate() (text streamed for one sequence)."""
        opts = ticket.opts
        stream = (opts.num_return_sequences == 1 and opts.logprobs is None
                  and (ticket.config.num_beams or 1) == 1)  # generate() streams no beams
        on_text = (lambda text: ticket.on_event(Delta(0, text))) if stream else None
        try:
            for gen in generate_indexed(self.lm, [(0, ticket.prepared.prompt)],
                                        dataclasses.replace(opts, batch_size=1),
                                        on_text=on_text):
                if ticket.cancelled:
                    break
                if not stream:
                    ticket.on_event(Delta(gen.sequence, gen.completion, gen.logprobs or ()))
                ticket.on_event(Finished(gen))
        except Exception as exc:
            if not isinstance(exc, NlgenError):
                log.exception("generation failed")
            ticket.on_event(Failed(getattr(exc, "message", None) or f"{type(exc).__name__}: "
                                   f"{exc}"))
        ticket.waiting.clear()
