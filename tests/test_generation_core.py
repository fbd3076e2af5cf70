"""nlgen.engine.generation on the tiny GPT-2: batching, seeds, stop strings, lengths, options."""

from __future__ import annotations

import logging

import pytest

from nlgen.engine.extra_options import parse_extra_options
from nlgen.engine.generation import GenerationStats, generate
from nlgen.engine.options import GPT2_SAMPLING, GenerationOptions
from nlgen.engine.sampling import build_generation_config
from nlgen.engine.streaming import cut_at_stop
from nlgen.errors import InputError, UsageError

PROMPTS = [
    "Once upon a time there was",
    "The fox",
    "A language model predicts the next word from the words that came before it.",
    "x",
    "Numbers such as 1, 2, 3",
    "The river was wide and slow, and in summer",
    "At night",
]


def completions(lm, prompts, **kw):
    return [g.completion for g in generate(lm, prompts, GenerationOptions(**kw))]


def test_batched_greedy_equals_one_by_one(tiny_lm):
    one = completions(tiny_lm, PROMPTS, greedy=True, max_new_tokens=24, batch_size=1)
    batched = completions(tiny_lm, PROMPTS, greedy=True, max_new_tokens=24, batch_size=4)
    assert batched == one
    assert len(set(one)) > 3  # the prompts really lead to different continuations


def test_output_order_follows_input_order(tiny_lm):
    results = list(generate(tiny_lm, PROMPTS, GenerationOptions(greedy=True, max_new_tokens=3,
                                                                batch_size=3)))
    assert [r.index for r in results] == list(range(len(PROMPTS)))
    assert [r.prompt for r in results] == PROMPTS
    assert all(r.text == r.prompt + r.completion for r in results)


def test_seed_reproducible_and_seeds_differ(tiny_lm):
    a = completions(tiny_lm, PROMPTS[:3], seed=7, max_new_tokens=20, batch_size=2)
    b = completions(tiny_lm, PROMPTS[:3], seed=7, max_new_tokens=20, batch_size=2)
    c = completions(tiny_lm, PROMPTS[:3], seed=8, max_new_tokens=20, batch_size=2)
    assert a == b
    assert a != c


def test_max_new_tokens_and_finish_reason(tiny_lm):
    [result] = generate(tiny_lm, ["The fox"], GenerationOptions(greedy=True, max_new_tokens=9))
    assert result.completion_tokens == 9
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(tiny_lm.tokenizer("The fox")["input_ids"])


def test_max_length_counts_the_prompt(tiny_lm):
    # Prompts of different lengths in one batch: each gets max_length - its own length.
    results = list(generate(tiny_lm, PROMPTS[:3], GenerationOptions(greedy=True, max_length=30,
                                                                    batch_size=3)))
    for r in results:
        assert r.prompt_tokens + r.completion_tokens == 30


def test_stop_string_spanning_tokens_cuts_before_first(tiny_lm):
    [full] = completions(tiny_lm, ["Once upon a time there was"], greedy=True, max_new_tokens=30)
    tokens = tiny_lm.tokenizer(full)["input_ids"]
    pieces = [tiny_lm.tokenizer.decode([t]) for t in tokens]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    expected = full[: full.find(stop)]
    [result] = generate(tiny_lm, ["Once upon a time there was"],
                        GenerationOptions(greedy=True, max_new_tokens=30, stop=(stop,)))
    assert result.completion == expected
    assert result.finish_reason == "stop"


def test_stop_string_absent_cuts_nothing(tiny_lm):
    [full] = completions(tiny_lm, ["The fox"], greedy=True, max_new_tokens=15)
    [cut] = completions(tiny_lm, ["The fox"], greedy=True, max_new_tokens=15,
                        stop=("\u2603never-there",))
    assert cut == full


def test_cut_at_stop_earliest_of_several():
    assert cut_at_stop("abc. def! ghi", [".", "!"]) == "abc"
    assert cut_at_stop("abc. def! ghi", ["!", "."]) == "abc"
    assert cut_at_stop("abc", ["x"]) is None


def test_streaming_pieces_add_up_to_the_result(tiny_lm):
    pieces: list[str] = []
    opts = GenerationOptions(greedy=True, max_new_tokens=25)
    [result] = generate(tiny_lm, ["The river"], opts, on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == result.completion


def test_streaming_never_prints_past_a_stop_string(tiny_lm):
    [full] = completions(tiny_lm, ["The river"], greedy=True, max_new_tokens=25)
    stop = full[8:11]
    pieces: list[str] = []
    opts = GenerationOptions(greedy=True, max_new_tokens=25, stop=(stop,))
    [result] = generate(tiny_lm, ["The river"], opts, on_text=pieces.append)
    assert "".join(pieces) == result.completion == full[: full.find(stop)]


def test_num_return_sequences(tiny_lm):
    results = list(generate(tiny_lm, ["The fox", "At night"],
                            GenerationOptions(num_return_sequences=3, seed=1, max_new_tokens=8)))
    assert [(r.index, r.sequence) for r in results] == [(i, s) for i in range(2) for s in range(3)]


def test_beam_search_is_transformers_beam_search(tiny_lm):
    import torch

    opts = GenerationOptions(num_beams=3, num_return_sequences=2, max_new_tokens=6)
    ours = [r.completion for r in generate(tiny_lm, ["The fox"], opts)]
    ids = tiny_lm.tokenizer("The fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = tiny_lm.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                     num_return_sequences=2, do_sample=False, max_new_tokens=6,
                                     pad_token_id=tiny_lm.tokenizer.pad_token_id)
    theirs = [tiny_lm.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)
              for row in out]
    assert ours == theirs and ours[0] != ours[1]
    assert ours == [r.completion for r in generate(tiny_lm, ["The fox"], opts)]


def test_long_prompt_truncated_from_the_left_with_a_warning(tiny_lm, caplog):
    long_prompt = "the fox and the heron walked " * 40  # far beyond the 128-token context
    with caplog.at_level(logging.WARNING, logger="nlgen"):
        [result] = generate(tiny_lm, [long_prompt], GenerationOptions(greedy=True,
                                                                      max_new_tokens=10))
    assert result.prompt_tokens == 128 - 10
    assert result.prompt == long_prompt
    assert "kept its last 118" in caplog.text


def test_long_prompt_rejected_with_no_truncate(tiny_lm):
    with pytest.raises(InputError, match="exceeds the model's 128-token context"):
        list(generate(tiny_lm, ["word " * 300],
                      GenerationOptions(max_new_tokens=10, truncate=False)))


def test_max_new_tokens_beyond_context_is_a_usage_error(tiny_lm):
    with pytest.raises(UsageError, match="no room"):
        list(generate(tiny_lm, ["hi"], GenerationOptions(max_new_tokens=500)))


def test_stats_count_tokens(tiny_lm):
    stats = GenerationStats()
    list(generate(tiny_lm, PROMPTS[:2], GenerationOptions(greedy=True, max_new_tokens=5),
                  stats=stats))
    assert (stats.prompts, stats.sequences, stats.new_tokens) == (2, 2, 10)
    assert stats.seconds > 0


def test_defaults_sample_like_the_gpt2_examples(tiny_lm):
    config = build_generation_config(tiny_lm, GenerationOptions())
    assert {k: getattr(config, k) for k in GPT2_SAMPLING} == GPT2_SAMPLING


def test_model_own_sampling_config_is_kept(tiny_lm):
    saved = tiny_lm.model.generation_config
    try:
        import copy

        own = copy.deepcopy(saved)
        own.do_sample, own.top_k, own.temperature = True, 7, 0.6
        tiny_lm.model.generation_config = own
        config = build_generation_config(tiny_lm, GenerationOptions())
        assert (config.top_k, config.temperature) == (7, 0.6)
    finally:
        tiny_lm.model.generation_config = saved


def test_user_options_reach_the_generation_config(tiny_lm):
    opts = GenerationOptions(temperature=0.7, top_k=11, top_p=0.8, min_p=0.05, typical_p=0.9,
                             repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3,
                             max_time=5.0,
                             extra=parse_extra_options(["epsilon_cutoff=0.001"]))
    config = build_generation_config(tiny_lm, opts)
    assert (config.temperature, config.top_k, config.top_p, config.min_p, config.typical_p,
            config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens,
            config.max_time, config.epsilon_cutoff) == (0.7, 11, 0.8, 0.05, 0.9, 1.3, 2, 3,
                                                        5.0, 0.001)
    assert config.do_sample is True
    greedy = build_generation_config(tiny_lm, GenerationOptions(greedy=True))
    assert greedy.do_sample is False


def test_no_repeat_ngram_size_changes_a_repetitive_greedy_output(tiny_lm, monkeypatch):
    from nlgen.engine import decode

    seen = []
    real_runner = decode.runner

    def runner(*args, **kw):  # whichever loop runs (generate() or nlgen.engine.decode), spied on
        run = real_runner(*args, **kw)

        def spy(**kwargs):
            out = run(**kwargs)
            seen.append(out[0, kwargs["input_ids"].shape[1]:].tolist())
            return out

        return spy

    monkeypatch.setattr(decode, "runner", runner)
    for size in (None, 2):
        list(generate(tiny_lm, ["The fox"], GenerationOptions(
            greedy=True, max_new_tokens=40, no_repeat_ngram_size=size)))
    plain, constrained = seen
    bigrams = list(zip(plain, plain[1:]))
    assert len(set(bigrams)) < len(bigrams)  # plain greedy repeats itself here
    bigrams = list(zip(constrained, constrained[1:]))
    assert len(set(bigrams)) == len(bigrams)


@pytest.mark.parametrize("pairs, value", [
    (["do_sample=true"], True), (["epsilon_cutoff=0.5"], 0.5),
    (["bad_words_ids=[[1, 2]]"], [[1, 2]]), (["early_stopping=never"], "never"),
    (["length-penalty=1.5"], 1.5),
])
def test_parse_extra_options_values(pairs, value):
    [(_, parsed)] = parse_extra_options(pairs)
    assert parsed == value


def test_parse_extra_options_unknown_key_lists_close_matches():
    with pytest.raises(UsageError) as info:
        parse_extra_options(["repetion_penalty=1.2"])
    assert "repetition_penalty" in info.value.hint


def test_parse_extra_options_needs_key_value():
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_extra_options(["top_k"])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
    ({"temperature": -1}, "--temperature must be 0 \\(greedy\\) or more"),
    ({"top_p": 1.5}, "--top-p must be in"),
    ({"top_k": -1}, "--top-k must be 0 or more"),
    ({"min_p": 2}, "--min-p must be in"),
    ({"typical_p": 0}, "--typical-p must be in"),
    ({"repetition_penalty": -1}, "--repetition-penalty"),
    ({"num_beams": 0}, "--num-beams"),
    ({"batch_size": 0}, "--batch-size"),
    ({"max_new_tokens": 5, "max_length": 9}, "not both"),
    ({"greedy": True, "temperature": 0.5}, "--greedy does not sample"),
    ({"greedy": True, "num_return_sequences": 2}, "one sequence per prompt"),
    ({"stop": ("",)}, "non-empty"),
    ({"max_time": 0}, "--max-time"),
])
def test_invalid_options_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        GenerationOptions(**kwargs)


def test_chat_without_template_is_an_input_error(tiny_lm):
    with pytest.raises(InputError, match="no chat template"):
        list(generate(tiny_lm, ["hi"], GenerationOptions(chat=True, max_new_tokens=2)))


def test_a_seeded_run_leaves_the_callers_random_state_and_imports_no_peft(tiny_lm, tiny_model):
    """--seed seeds beam sampling for the call only: the caller's torch generator is as it
    was, and transformers.set_seed (which imports peft) is not used."""
    import subprocess
    import sys

    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    opts = GenerationOptions(max_new_tokens=3, seed=7, num_beams=2, extra=(("do_sample", True),))
    list(generate(tiny_lm, ["Once upon"], opts))
    assert torch.equal(torch.rand(3), expected)
    code = ("import sys; from nlgen.models.loading import load_model; "
            "from nlgen.engine.generation import generate; "
            "from nlgen.engine.options import GenerationOptions as O; "
            f"lm = load_model({str(tiny_model)!r}, device='cpu', dtype='float32'); "
            "list(generate(lm, ['Once'], O(max_new_tokens=2, seed=3))); "
            "print('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
