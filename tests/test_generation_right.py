"""Every answer right or refused: stop strings, token counts, cut prompts, seeds, greedy spellings.

The tiny random GPT-2 of conftest (float32, CPU). Stop strings are picked from the model's own
greedy output, so that they straddle the prompt and the completion, or lie inside it.
"""

from __future__ import annotations

import logging

import pytest

from nlgen.engine import decode
from nlgen.engine.extra_options import parse_extra_options
from nlgen.engine.generation import generate
from nlgen.engine.options import GenerationOptions
from nlgen.engine.sampling import build_generation_config
from nlgen.engine.streaming import StopStrings
from nlgen.errors import InputError, UsageError

PROMPT = "The cat sat"
OTHER = "Once upon a time there was a"  # runs on after PROMPT has stopped, in a batch
PROMPTS = ["The fox", "Once upon a time", "At night the heron", "A", "the fox and the heron",
           "She said", "In the beginning there was", "Why", "The cat sat", "Tomorrow we"]


def record(g, logprobs=False):
    fields = (g.completion, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens)
    if logprobs:
        fields += (tuple((t.token_id, round(t.logprob, 4)) for t in g.logprobs),)
    return fields


def alone_and_in_a_batch(lm, opts):
    [alone] = generate(lm, [PROMPT], opts)
    first, _ = generate(lm, [PROMPT, OTHER], opts)
    return alone, first


@pytest.fixture(scope="module")
def plain(tiny_lm):
    """PROMPT's greedy completion of 12 tokens, with no stop string."""
    [g] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=12))
    assert g.finish_reason == "length" and len(g.completion) >= 4
    return g


def test_a_stop_string_straddling_prompt_and_completion_is_no_match(tiny_lm, plain):
    stop = PROMPT[-3:] + plain.completion[:2]  # begins in the prompt, ends in the output
    assert stop in plain.text and stop not in plain.completion
    opts = GenerationOptions(greedy=True, max_new_tokens=12, stop=(stop,), logprobs=1)
    alone, batched = alone_and_in_a_batch(tiny_lm, opts)
    assert record(alone, True) == record(batched, True)
    assert (alone.completion, alone.finish_reason, alone.completion_tokens) == (
        plain.completion, "length", 12)
    assert len(alone.logprobs) == 12


def test_a_stop_inside_the_completion_ends_tokens_and_logprobs_there(tiny_lm, plain):
    stop = plain.completion[2:4]
    before = plain.completion[: plain.completion.index(stop)]
    opts = GenerationOptions(greedy=True, max_new_tokens=12, stop=(stop,), logprobs=1)
    alone, batched = alone_and_in_a_batch(tiny_lm, opts)
    assert record(alone, True) == record(batched, True)
    assert (alone.completion, alone.finish_reason) == (before, "stop")
    [free] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=12,
                                                           logprobs=0))
    greedy_ids = [t.token_id for t in free.logprobs]
    # completion_tokens is the shortest run of tokens whose text holds the stop string (the
    # token that completes it included): no padding of the batch, no EOS after it.
    n = alone.completion_tokens
    text = tiny_lm.tokenizer.decode
    assert stop in text(greedy_ids[:n]) and stop not in text(greedy_ids[: n - 1])
    assert [t.token_id for t in alone.logprobs] == greedy_ids[:n]


def test_the_stop_criterion_is_the_post_processing(tiny_lm, plain):
    """The criterion (during generation) and the cut (after it) agree: noted or scanned."""
    stop = plain.completion[2:4]
    ids = tiny_lm.tokenizer(plain.completion)["input_ids"]
    scanned = StopStrings(tiny_lm.tokenizer, (stop,)).end(0, ids, noted=False)
    stops = StopStrings(tiny_lm.tokenizer, (stop,))
    import torch

    criterion = stops.criteria(2)
    for n in range(1, len(ids) + 1):
        row = torch.tensor([[5, 6] + ids[:n]])
        if bool(criterion(row, None)[0]):
            break
    assert stops.end(0, ids) == scanned and scanned[0] == n


def test_one_prompt_with_a_stop_takes_the_lean_loop(tiny_lm, plain, monkeypatch):
    opts = GenerationOptions(greedy=True, max_new_tokens=12, stop=(plain.completion[2:4],))
    assert decode.runner(tiny_lm, build_generation_config(tiny_lm, opts), rows=1) is not None
    calls = []
    real = decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    [g] = generate(tiny_lm, [PROMPT], opts)
    assert calls == [1] and g.finish_reason == "stop"


def test_streamed_text_matches_the_record_for_a_straddling_stop(tiny_lm, plain):
    stop = PROMPT[-3:] + plain.completion[:2]
    pieces: list[str] = []
    [g] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=12,
                                                        stop=(stop,)), on_text=pieces.append)
    assert "".join(pieces) == g.completion == plain.completion


def test_eos_is_counted_alone_and_in_a_batch_as_one_token_without_text(tiny_lm, plain):
    ids = tiny_lm.tokenizer(plain.completion)["input_ids"]
    eos = ids[1]  # the model's second greedy token, made an end-of-sequence token
    opts = GenerationOptions(greedy=True, max_new_tokens=12, logprobs=0,
                             extra=parse_extra_options([f"eos_token_id={eos}"]))
    alone, batched = alone_and_in_a_batch(tiny_lm, opts)
    assert record(alone, True) == record(batched, True)
    assert (alone.finish_reason, alone.completion_tokens, len(alone.logprobs)) == ("eos", 2, 2)
    assert alone.completion == tiny_lm.tokenizer.decode(ids[:1])


def test_beam_search_never_returns_text_past_a_stop(tiny_lm):
    [free] = generate(tiny_lm, [PROMPT], GenerationOptions(num_beams=2, max_new_tokens=12))
    stop = free.completion[2:4]
    gens = list(generate(tiny_lm, [PROMPT], GenerationOptions(
        num_beams=2, num_return_sequences=2, max_new_tokens=12, stop=(stop,))))
    # A beam that meets the stop string is finished there (as with transformers' own
    # stop_strings); the best beams may be others.
    for g in gens:
        assert stop not in g.completion
        assert (g.finish_reason == "stop") == (g.completion_tokens < 12)


# ------------------------------------------------------------------ --max-length and the prompt


def test_max_length_shorter_than_the_prompt_says_so_and_text_is_what_the_model_saw(
        tiny_lm, caplog):
    prompt = "the fox and the heron walked"
    ids = tiny_lm.tokenizer(prompt)["input_ids"]
    assert len(ids) > 4
    with caplog.at_level(logging.WARNING, logger="nlgen"):
        [g] = generate(tiny_lm, [prompt], GenerationOptions(greedy=True, max_length=4))
    assert f"has {len(ids)} tokens; --max-length 4 leaves room for 3" in caplog.text
    assert "kept its last 3 tokens" in caplog.text and "context" not in caplog.text
    assert (g.prompt_tokens, g.completion_tokens, g.prompt) == (3, 1, prompt)
    assert g.text == tiny_lm.tokenizer.decode(ids[-3:]) + g.completion
    with pytest.raises(InputError, match="--max-length 4 leaves room for 3"):
        list(generate(tiny_lm, [prompt], GenerationOptions(max_length=4, truncate=False)))


# ------------------------------------------------------------------ seeds and batch sizes


@pytest.mark.parametrize("opts", [GenerationOptions(seed=7, max_new_tokens=16),
                                  GenerationOptions(greedy=True, max_new_tokens=16),
                                  GenerationOptions(seed=3, max_new_tokens=16, stop=("e",))],
                         ids=["seeded", "greedy", "seeded-stop"])
def test_float32_records_do_not_depend_on_the_batch_size(tiny_lm, opts):
    """README: in float32, a prompt's record is the same at any batch size (and for any part
    of the input run on its own, as a resumed run or another process does)."""
    import dataclasses

    runs = [[record(g) for g in generate(tiny_lm, PROMPTS,
                                         dataclasses.replace(opts, batch_size=b))]
            for b in (1, 3, 8)]
    assert runs[0] == runs[1] == runs[2]
    from nlgen.engine.generation import generate_indexed
    from nlgen.inputs import Prompt

    part = [record(g) for g in generate_indexed(
        tiny_lm, [(i, Prompt(PROMPTS[i])) for i in (2, 5, 9)], opts)]
    assert part == [runs[0][i] for i in (2, 5, 9)]


# ------------------------------------------------------------------ greedy, however it is said


def test_temperature_zero_is_greedy_with_a_notice(tiny_lm, caplog):
    [greedy] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=8))
    with caplog.at_level(logging.INFO, logger="nlgen"):
        [zero] = generate(tiny_lm, [PROMPT], GenerationOptions(temperature=0, max_new_tokens=8,
                                                               seed=5))
    assert zero.completion == greedy.completion
    assert "--temperature 0: greedy decoding" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nlgen"):
        [ignored] = generate(tiny_lm, [PROMPT], GenerationOptions(
            temperature=0, top_k=5, max_new_tokens=8))
    assert ignored.completion == greedy.completion
    assert "--temperature 0 is greedy decoding: --top-k ignored" in caplog.text


def test_do_sample_false_is_greedy_despite_nlgen_defaults(tiny_lm):
    [greedy] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=8))
    opts = GenerationOptions(max_new_tokens=8, extra=parse_extra_options(["do_sample=false"]))
    [g] = generate(tiny_lm, [PROMPT], opts)
    assert g.completion == greedy.completion


def test_an_openai_record_with_temperature_zero_is_greedy(tiny_lm):
    from nlgen.inputs import Record
    from nlgen.jobs import batchjob

    line = Record("t", 1, {"custom_id": "a", "method": "POST", "url": "/v1/completions",
                           "body": {"prompt": PROMPT, "temperature": 0, "max_tokens": 8}})
    [request] = batchjob.parse_records([line], batchjob.OPENAI, GenerationOptions(seed=1))
    [g] = generate(tiny_lm, [request.prompt], request.options)
    [greedy] = generate(tiny_lm, [PROMPT], GenerationOptions(greedy=True, max_new_tokens=8))
    assert g.completion == greedy.completion


@pytest.mark.parametrize("kwargs, message", [
    ({"extra": (("do_sample", False),), "top_k": 5}, "-o do_sample=false does not sample; "
                                                      "drop --top-k"),
    ({"greedy": True, "extra": (("do_sample", True),)}, "--greedy does not sample; drop -o "
                                                         "do_sample=true"),
    ({"temperature": 0, "extra": (("do_sample", True),)}, "--temperature 0 does not sample"),
    ({"temperature": -0.5}, "--temperature must be 0 \\(greedy\\) or more"),
    ({"temperature": 0, "extra": (("epsilon_cutoff", 3e-4),)}, "--temperature 0 does not "
                                                                "sample; drop -o epsilon_cutoff"),
])
def test_contradictions_of_the_users_own_options(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GenerationOptions(**kwargs)


@pytest.mark.parametrize("pair, message", [
    ("epsilon_cutoff=5", "-o epsilon_cutoff must be a number strictly between 0 and 1"),
    ("epsilon_cutoff=0", "strictly between 0 and 1"),
    ("eta_cutoff=1", "-o eta_cutoff must be a number strictly between 0 and 1"),
    ("top_h=1.5", "-o top_h must be a number in (0, 1]"),
    ("encoder_repetition_penalty=0", "greater than 0"),
    ("min_length=-1", "-o min_length must be an integer, 0 or more"),
    ("do_sample=3", "-o do_sample must be true or false"),
])
def test_extra_options_out_of_their_documented_range(pair, message):
    with pytest.raises(UsageError) as caught:
        parse_extra_options([pair])
    assert message in caught.value.message


def test_extra_options_in_range_are_kept():
    assert parse_extra_options(["epsilon_cutoff=3e-4", "eta_cutoff=0.001"]) == (
        ("epsilon_cutoff", 3e-4), ("eta_cutoff", 0.001))
