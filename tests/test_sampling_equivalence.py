"""nlgen.engine.choosing against transformers itself: for the same tokens and logits, the
distribution the engine draws from equals the softmax of what generate()'s own
LogitsProcessorList gives (``model._get_logits_processor``, the list generate() builds) to 1e-6,
for every processor and warper the engine runs; and the engine's draws follow that distribution
(a chi-square test over many seeded draws)."""

from __future__ import annotations

import pytest

from nlgen.engine.choosing import Chooser

VOCAB = 400  # the tiny GPT-2's
EOS = 0
PROMPT_LENGTH = 12
# A prompt and some generated tokens with repeats, so penalties and n-gram bans have work.
TOKENS = [5, 17, 42, 17, 42, 99, 3, 17, 42, 250, 7, 5, 17, 42, 8, 9, 17]

CASES = {
    "temperature": {"do_sample": True, "temperature": 0.7, "top_k": 0},
    "top-k": {"do_sample": True, "top_k": 20},
    "top-k-ties": {"do_sample": True, "top_k": 5, "tie": True},
    "top-p": {"do_sample": True, "top_k": 0, "top_p": 0.8},
    "temperature-top-k-top-p": {"do_sample": True, "temperature": 1.3, "top_k": 50,
                                "top_p": 0.9},
    "min-p": {"do_sample": True, "top_k": 0, "min_p": 0.05},
    "typical": {"do_sample": True, "top_k": 0, "typical_p": 0.7},
    "epsilon": {"do_sample": True, "top_k": 0, "epsilon_cutoff": 3e-3},
    "eta": {"do_sample": True, "top_k": 0, "eta_cutoff": 3e-3},
    "repetition-penalty": {"do_sample": True, "top_k": 0, "repetition_penalty": 1.5},
    "no-repeat-ngram": {"do_sample": True, "top_k": 50, "no_repeat_ngram_size": 2},
    "no-repeat-unigram": {"do_sample": True, "top_k": 0, "no_repeat_ngram_size": 1},
    "no-repeat-4gram": {"do_sample": True, "top_k": 0, "no_repeat_ngram_size": 4},
    "no-repeat-ngram-longer-than-the-text": {"do_sample": True, "top_k": 0,
                                             "no_repeat_ngram_size": 30},
    "bad-words": {"do_sample": True, "top_k": 0, "bad_words_ids": [[99], [8, 9, 42], [17, 3]]},
    "min-new-tokens": {"do_sample": True, "top_k": 0, "min_new_tokens": 10},
    "min-length": {"do_sample": True, "top_k": 0, "min_length": 30},
    # Reached: EOS free again. Several EOS ids, one outside the vocabulary (ignored).
    "min-new-tokens-reached": {"do_sample": True, "top_k": 0, "min_new_tokens": 5},
    "min-length-reached": {"do_sample": True, "top_k": 0, "min_length": 17},
    "min-new-tokens-eos-ids": {"do_sample": True, "top_k": 0, "min_new_tokens": 10,
                               "eos_token_id": [EOS, 7, VOCAB + 5]},
    "greedy-min-new-tokens": {"do_sample": False, "min_new_tokens": 10,
                              "eos_token_id": [EOS, 7]},
    "all-at-once": {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95,
                    "repetition_penalty": 1.2, "no_repeat_ngram_size": 3,
                    "bad_words_ids": [[99]], "min_new_tokens": 8},
    "greedy-penalties": {"do_sample": False, "repetition_penalty": 1.3,
                         "no_repeat_ngram_size": 2},
}


def _config(fields: dict):
    from transformers import GenerationConfig

    fields = {k: v for k, v in fields.items() if k != "tie"}
    return GenerationConfig(**{"eos_token_id": EOS, "pad_token_id": EOS, **fields})


def _scores(seed: int, tie: bool = False):
    import torch

    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, VOCAB, generator=generator) * 2.5  # (1, V) float32
    scores[0, EOS] = scores.max() + 1  # EOS likely: min-length and min-new-tokens must act
    if tie:  # the 5th best tied with two more: top-k keeps every tie, as transformers does
        order = scores[0].argsort(descending=True)
        scores[0, order[5:7]] = float(scores[0, order[4]])
    return scores


def _reference(model, config, scores):
    """generate()'s own processors and warpers for these tokens: softmax of their output (V,)."""
    import torch
    from transformers import LogitsProcessorList

    ids = torch.tensor([TOKENS])
    model._prepare_special_tokens(config, True, device="cpu")  # as generate() does first
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=PROMPT_LENGTH, encoder_input_ids=ids,
        logits_processor=LogitsProcessorList(), device="cpu")
    out = processors(ids, scores.clone())[0]
    if not config.do_sample:
        probs = torch.zeros(VOCAB)
        probs[int(out.argmax())] = 1.0
        return probs
    return torch.softmax(out, dim=-1)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_distribution_is_transformers(tiny_lm, name, seed):
    import torch

    fields = CASES[name]
    config = _config(fields)
    scores = _scores(seed, fields.get("tie", False))
    expected = _reference(tiny_lm.model, config, scores)
    got = Chooser(config, PROMPT_LENGTH, seed=0).distribution(TOKENS, scores.clone())
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), float((got - expected).abs().max())
    # The same tokens are possible: nothing kept that transformers drops, nor the reverse.
    assert torch.equal(got > 0, expected > 0)


def _chi_square_p(counts, probs) -> float:
    """The p-value of observed ``counts`` under ``probs`` (bins of expected count < 5 merged)."""
    import torch

    total = counts.sum()
    expected = probs * total
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # merge the small rest into the last big bin
        obs = torch.cat([obs[:-2], (obs[-2] + obs[-1])[None]])
        exp = torch.cat([exp[:-2], (exp[-2] + exp[-1])[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["temperature-top-k-top-p", "min-p", "typical",
                                  "all-at-once"])
def test_draws_follow_the_distribution(tiny_lm, name):
    import torch

    fields = CASES[name]
    config = _config(fields)
    scores = _scores(3)
    expected = _reference(tiny_lm.model, config, scores).double()
    chooser = Chooser(config, PROMPT_LENGTH, seed=12345)
    draws = 20_000
    values, indices = chooser.candidates(TOKENS, scores)  # the per-step work, done once
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for _ in range(draws):
        counts[chooser.draw(values, indices, VOCAB)] += 1
    assert counts[expected == 0].sum() == 0  # never a token transformers rules out
    assert _chi_square_p(counts, expected) > 1e-3


def test_the_chi_square_test_can_fail():
    """The test above has teeth: draws from a slightly different distribution are caught."""
    import torch

    probs = torch.softmax(_scores(3)[0].double(), dim=-1)
    shifted = torch.softmax(_scores(3)[0].double() * 1.1, dim=-1)
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(shifted, 20_000, replacement=True, generator=generator)
    counts = torch.bincount(draws, minlength=VOCAB).double()
    assert _chi_square_p(counts, probs) < 1e-3
    same = torch.multinomial(probs, 20_000, replacement=True, generator=generator)
    assert _chi_square_p(torch.bincount(same, minlength=VOCAB).double(), probs) > 1e-3


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_kept_up_to_date_equals_transformers_at_every_step(size):
    """nlgen's NoRepeatNGram indexes a growing sequence once; at every length, and for another
    sequence given to the same object afterwards, it bans what transformers' own class bans."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from nlgen.engine.choosing import NoRepeatNGram

    ours, theirs = NoRepeatNGram(size), NoRepeatNGramLogitsProcessor(size)
    other = [9, 9, 8, 9, 9, 7, 17, 42]
    sequences = [TOKENS[:k] for k in range(1, len(TOKENS) + 1)] + [other, TOKENS[:5], TOKENS]
    banning = 0
    for i, tokens in enumerate(sequences):
        ids = torch.tensor([tokens])
        scores = _scores(i)
        expected = theirs(ids, scores.clone())
        got = ours(ids, scores.clone())
        assert torch.equal(got, expected), (size, tokens)
        banning += bool(torch.isinf(expected).any())
    assert banning >= 3  # the text repeats itself: many steps have something to ban
