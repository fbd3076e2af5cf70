"""nlgen.engine.continuous: requests that join a running batch get what ``nlgen generate`` gives
each alone (greedy, seeded sampling, stop strings, logprobs), their text streamed in pieces that
add up to the record; cancelled tickets free their slots; a full queue is refused at once; the
engine closes draining or cancelling."""

from __future__ import annotations

import queue
import threading

import pytest

from nlgen.engine.continuous import Busy, Closed, Delta, Engine, Failed, Finished
from nlgen.engine.generation import generate
from nlgen.engine.options import GenerationOptions
from nlgen.errors import InputError, UsageError
from nlgen.inputs import Prompt

PROMPTS = ["The quick brown fox", "Once upon a time", "A", "It was the best of times, it was"]
TIMEOUT = 60


class Collected:
    """A ticket's events, in order, and its finished records."""

    def __init__(self, sequences: int = 1) -> None:
        self.events: list = []
        self.sequences = sequences
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Failed) or len(self.generations) == self.sequences:
            self.done.set()

    @property
    def generations(self):
        return sorted((e.generation for e in self.events if isinstance(e, Finished)),
                      key=lambda g: g.sequence)

    def text(self, sequence: int = 0) -> str:
        return "".join(e.text for e in self.events
                       if isinstance(e, Delta) and e.sequence == sequence)

    def wait(self):
        assert self.done.wait(TIMEOUT), "the ticket did not finish"
        return self.generations


@pytest.fixture(scope="module")
def llama_lm(tiny_llama):
    from nlgen.models.loading import load_model

    return load_model(str(tiny_llama), device="cpu", dtype="float32")


def _alone(lm, prompt: str, opts: GenerationOptions):
    return list(generate(lm, [prompt], opts))


def _record(gen):
    return (gen.sequence, gen.completion, gen.completion_tokens, gen.finish_reason,
            gen.prompt_tokens)


@pytest.mark.parametrize("model", ["tiny_lm", "llama_lm"])
@pytest.mark.parametrize("opts", [
    GenerationOptions(greedy=True, max_new_tokens=24),
    GenerationOptions(seed=3, max_new_tokens=24, temperature=0.9, top_p=0.9),
    GenerationOptions(seed=4, max_new_tokens=20, num_return_sequences=3,
                      no_repeat_ngram_size=2, top_k=20),
    GenerationOptions(seed=5, max_new_tokens=20, min_p=0.05, repetition_penalty=1.2),
], ids=["greedy", "top-p", "n3-ngram", "min-p"])
def test_requests_together_get_what_each_gets_alone(request, model, opts):
    lm = request.getfixturevalue(model)
    engine = Engine(lm, slots=4)  # fewer slots than sequences: some wait for a free one
    try:
        tickets = []
        for prompt in PROMPTS:
            got = Collected(opts.num_return_sequences)
            engine.submit(Prompt(prompt), opts, got)
            tickets.append(got)
        for prompt, got in zip(PROMPTS, tickets, strict=True):
            expected = _alone(lm, prompt, opts)
            assert [_record(g) for g in got.wait()] == [_record(g) for g in expected], prompt
            for g in got.generations:  # the streamed pieces add up to the record
                assert got.text(g.sequence) == g.completion
    finally:
        engine.close()


def test_a_request_that_arrives_mid_decode_joins_the_batch(tiny_lm):
    opts = GenerationOptions(seed=8, max_new_tokens=40)
    engine = Engine(tiny_lm, slots=4)
    try:
        first = Collected()
        started = threading.Event()

        def on_event(event):
            first(event)
            started.set()

        engine.submit(Prompt(PROMPTS[0]), opts, on_event)
        assert started.wait(TIMEOUT)
        second = Collected()
        engine.submit(Prompt(PROMPTS[1]), opts, second)
        for prompt, got in ((PROMPTS[0], first), (PROMPTS[1], second)):
            assert [_record(g) for g in got.wait()] == \
                [_record(g) for g in _alone(tiny_lm, prompt, opts)]
    finally:
        engine.close()


def test_stop_strings_and_logprobs_as_generate_gives_them(tiny_lm):
    alone = _alone(tiny_lm, PROMPTS[1], GenerationOptions(greedy=True, max_new_tokens=30))
    stop = alone[0].completion[8:11]  # text the completion is sure to hold
    assert stop.strip()
    opts = GenerationOptions(greedy=True, max_new_tokens=30, stop=(stop,), logprobs=3)
    expected = _alone(tiny_lm, PROMPTS[1], opts)[0]
    assert expected.finish_reason == "stop"
    engine = Engine(tiny_lm, slots=2)
    try:
        got = Collected()
        engine.submit(Prompt(PROMPTS[1]), opts, got)
        [gen] = got.wait()
    finally:
        engine.close()
    assert _record(gen) == _record(expected) and got.text() == gen.completion
    assert stop not in got.text()
    assert len(gen.logprobs) == gen.completion_tokens
    for mine, theirs in zip(gen.logprobs, expected.logprobs, strict=True):
        assert mine.token_id == theirs.token_id
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert [t.token_id for t in mine.top] == [t.token_id for t in theirs.top]
    streamed = [lp for e in got.events if isinstance(e, Delta) for lp in e.logprobs]
    assert [t.token_id for t in streamed] == [t.token_id for t in gen.logprobs]


def test_a_cancelled_ticket_frees_its_slot(tiny_lm):
    engine = Engine(tiny_lm, slots=1, max_queue=4)
    try:
        holder = Collected(16)
        ticket = engine.submit(Prompt(PROMPTS[0]), GenerationOptions(
            seed=1, max_new_tokens=100, num_return_sequences=16), holder)
        ticket.cancel()
        after = Collected()
        engine.submit(Prompt(PROMPTS[1]), GenerationOptions(greedy=True, max_new_tokens=5), after)
        assert after.wait()[0].completion_tokens >= 1
        assert len(holder.generations) < 16  # it stopped where it was
        assert not any(isinstance(e, Failed) for e in holder.events)  # and was told nothing
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once(tiny_lm):
    engine = Engine(tiny_lm, slots=1, max_queue=0)
    try:
        holder = Collected(16)
        ticket = engine.submit(Prompt(PROMPTS[0]), GenerationOptions(
            seed=1, max_new_tokens=100, num_return_sequences=16), holder)
        with pytest.raises(Busy, match="--max-queue 0"):
            engine.submit(Prompt(PROMPTS[1]), GenerationOptions(greedy=True), Collected())
        ticket.cancel()
    finally:
        engine.close()


def test_bad_requests_are_refused_when_submitted(tiny_lm):
    engine = Engine(tiny_lm, slots=1)
    try:
        with pytest.raises(UsageError, match="context"):
            engine.submit(Prompt("x"), GenerationOptions(max_new_tokens=10_000), Collected())
        with pytest.raises(InputError, match="empty"):
            engine.submit(Prompt(""), GenerationOptions(), Collected())
        got = Collected()  # and the engine goes on
        engine.submit(Prompt(PROMPTS[0]), GenerationOptions(greedy=True, max_new_tokens=3), got)
        assert got.wait()[0].completion_tokens == 3
    finally:
        engine.close()


def test_close_drains_or_cancels(tiny_lm):
    engine = Engine(tiny_lm, slots=1)
    drained = Collected(4)
    engine.submit(Prompt(PROMPTS[0]), GenerationOptions(seed=2, max_new_tokens=30,
                                                        num_return_sequences=4), drained)
    engine.close(drain=True)
    assert len(drained.generations) == 4
    with pytest.raises(Closed):
        engine.submit(Prompt(PROMPTS[0]), GenerationOptions(), Collected())

    engine = Engine(tiny_lm, slots=1)
    cut = Collected(16)
    engine.submit(Prompt(PROMPTS[0]), GenerationOptions(seed=2, max_new_tokens=100,
                                                        num_return_sequences=16), cut)
    engine.close(drain=False)
    assert isinstance(cut.events[-1], Failed) and len(cut.generations) < 16


def test_what_the_batch_cannot_run_goes_to_generate_whole(tiny_lm):
    for opts in (GenerationOptions(num_beams=2, greedy=True, max_new_tokens=12),
                 GenerationOptions(seed=6, max_new_tokens=12, engine="transformers")):
        engine = Engine(tiny_lm, slots=2)
        try:
            got = Collected()
            engine.submit(Prompt(PROMPTS[1]), opts, got)
            [gen] = got.wait()
        finally:
            engine.close()
        assert _record(gen) == _record(_alone(tiny_lm, PROMPTS[1], opts)[0])
        assert got.text() == gen.completion


def test_events_come_from_one_thread_in_order(tiny_lm):
    """Per sequence: its Deltas, then its Finished, nothing after."""
    seen: queue.Queue = queue.Queue()
    engine = Engine(tiny_lm, slots=2)
    try:
        got = Collected(2)

        def on_event(event):
            seen.put(threading.current_thread().name)
            got(event)

        engine.submit(Prompt(PROMPTS[2]), GenerationOptions(seed=9, max_new_tokens=15,
                                                            num_return_sequences=2), on_event)
        got.wait()
    finally:
        engine.close()
    assert set(seen.queue) == {"nlgen-engine"}
    for s in range(2):
        mine = [e for e in got.events if getattr(e, "sequence", None) == s
                or (isinstance(e, Finished) and e.generation.sequence == s)]
        assert isinstance(mine[-1], Finished)
        assert not any(isinstance(e, Finished) for e in mine[:-1])
