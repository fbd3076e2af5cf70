"""nlgen.engine.sampling: per-prompt seeded streams, the same at any batch size, true to softmax."""

from __future__ import annotations

import math
import warnings

import pytest

from nlgen.engine.options import GenerationOptions
from nlgen.engine.sampling import (
    build_generation_config,
    build_warpers,
    gumbel_sampler,
    row_seed,
    seeded_generate,
)

PROMPTS = [
    "Once upon a time there was",
    "The fox",
    "A language model predicts the next word from the words that came before it.",
    "x",
    "Numbers such as 1, 2, 3",
    "The river was wide and slow, and in summer",
    "At night",
    "Perplexity measures",
]


def sample(lm, prompts, batch_size, *, seed=7, n=2, max_new=12, **opts):
    """{(index, sequence): new token ids}, batches of `batch_size` prompts, left padded."""
    import torch

    config = build_generation_config(lm, GenerationOptions(num_return_sequences=n, **opts))
    lm.tokenizer.padding_side = "left"
    out = {}
    indexed = list(enumerate(prompts))
    for start in range(0, len(indexed), batch_size):
        batch = indexed[start:start + batch_size]
        enc = lm.tokenizer([p for _, p in batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            ids = seeded_generate(lm.model, enc["input_ids"], enc["attention_mask"],
                                  generation_config=config, seed=seed,
                                  indices=[i for i, _ in batch], max_new_tokens=max_new)
        new = ids[:, enc["input_ids"].shape[1]:].tolist()
        for b, (i, _) in enumerate(batch):
            for s in range(n):
                out[(i, s)] = _until_eos(new[b * n + s], config.eos_token_id)
    return out


def _until_eos(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_same_tokens_at_batch_size_1_and_8(tiny_lm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sampling flags set without do_sample" noise
        one = sample(tiny_lm, PROMPTS, 1)
    eight = sample(tiny_lm, PROMPTS, 8)
    assert one == eight
    # Sequences of one prompt differ from each other (their own streams), and sampling ran.
    assert sum(one[(i, 0)] != one[(i, 1)] for i in range(len(PROMPTS))) >= len(PROMPTS) - 1


def test_stream_follows_the_index_not_the_batch_position(tiny_lm):
    shuffled = sample(tiny_lm, PROMPTS[::-1], 3, n=1)
    straight = sample(tiny_lm, PROMPTS, 3, n=1)
    last = len(PROMPTS) - 1
    # Same prompt, other global index: another stream. Same prompt and index: same tokens
    # whatever the neighbours (here the prompt at index 0 sits with other prompts).
    assert shuffled[(0, 0)] != straight[(last, 0)]
    solo = sample(tiny_lm, PROMPTS[:1], 1, n=1)
    assert solo[(0, 0)] == straight[(0, 0)]


def test_other_seed_other_text(tiny_lm):
    a = sample(tiny_lm, PROMPTS, 4, seed=1, n=1)
    b = sample(tiny_lm, PROMPTS, 4, seed=2, n=1)
    assert sum(a[k] != b[k] for k in a) >= len(PROMPTS) - 1


def test_warpers_and_penalties_apply(tiny_lm):
    # top_k=1 leaves one token: the seeded sampler must then agree with greedy decoding.
    topk1 = sample(tiny_lm, PROMPTS[:4], 4, n=1, top_k=1, repetition_penalty=1.3)
    greedy = sample(tiny_lm, PROMPTS[:4], 4, n=1, greedy=True, repetition_penalty=1.3)
    assert topk1 == greedy


def test_row_seed_is_stable():
    assert row_seed(7, 0, 0) == row_seed(7, 0, 0)
    assert len({row_seed(7, i, s) for i in range(50) for s in range(3)}) == 150
    assert row_seed(7, 3, 0) == 12583072904591373792  # fixed: the stream must not change


def _chi_square(counts, probs, draws):
    """Pearson's statistic over tokens expected 5+ times, the rest pooled; and its dof."""
    big = [t for t in range(len(probs)) if probs[t] * draws >= 5]
    stat = sum((counts[t] - probs[t] * draws) ** 2 / (probs[t] * draws) for t in big)
    rest_p = 1.0 - sum(probs[t] for t in big)
    rest_c = draws - sum(counts[t] for t in big)
    if rest_p * draws >= 5:
        stat += (rest_c - rest_p * draws) ** 2 / (rest_p * draws)
        return stat, len(big)
    return stat, len(big) - 1


# The nlgen defaults (top-k 50, top-p 0.95), a sharper top-k, and the whole vocabulary.
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7, "top_k": 20},
                                  {"temperature": 1.3, "top_k": 0}])
def test_first_token_frequencies_match_the_softmax(tiny_lm, opts):
    import torch

    draws = 6000
    config = build_generation_config(tiny_lm, GenerationOptions(top_p=1.0, **opts))
    enc = tiny_lm.tokenizer(["The river was wide"], return_tensors="pt")
    with torch.inference_mode():
        logits = tiny_lm.model(**enc).logits[:, -1].float()  # (1, V)
    warped = build_warpers(config)(enc["input_ids"], logits.clone())  # (1, V)
    probs = torch.softmax(warped, dim=-1)[0].double().tolist()
    assert (min(probs) > 0) == (opts.get("top_k") == 0)
    # One row per draw, each with its own stream: as many prompts sampled once.
    sampler = gumbel_sampler(3, [(i, 0) for i in range(draws)])
    scores = sampler(None, warped.expand(draws, -1).clone())  # (draws, V)
    chosen = scores.argmax(dim=-1).tolist()
    counts = [0] * len(probs)
    for token in chosen:
        counts[token] += 1
    assert all(probs[t] > 0 for t in chosen)  # nothing the warpers removed
    stat, dof = _chi_square(counts, probs, draws)
    # Mean dof, sd sqrt(2 dof): 6 sd is loose enough never to flake, tight enough to catch a
    # biased sampler (e.g. float32 noise, a skipped log-softmax under temperature).
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)


@pytest.mark.parametrize("opts", [
    GenerationOptions(), GenerationOptions(greedy=True),
    GenerationOptions(top_p=0.5, temperature=0.7), GenerationOptions(num_beams=2),
], ids=["default", "greedy", "top-p", "beams"])
def test_resolve_config_fills_what_generate_fills(tiny_lm, opts):
    """sampling.resolve_config, without the model, equals generate()'s own resolution."""
    from nlgen.engine.sampling import build_generation_config, resolve_config

    config = build_generation_config(tiny_lm, opts)
    expected, _ = tiny_lm.model._prepare_generation_config(config)
    assert resolve_config(tiny_lm.model.generation_config, config).to_dict() == expected.to_dict()
