"""nlgen.engine.decode: the one-prompt loop gives generate()'s tokens and its distribution."""

from __future__ import annotations

import pytest

from nlgen.engine import decode
from nlgen.engine.generation import generate
from nlgen.engine.options import GenerationOptions
from nlgen.engine.sampling import build_generation_config

PROMPTS = ["The quick brown fox", "Once upon a time", "A"]


def _ids(lm, prompt):
    import torch

    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids, torch.ones_like(ids)


@pytest.fixture(scope="module")
def llama_lm(tiny_llama):
    from nlgen.models.loading import load_model

    return load_model(str(tiny_llama), device="cpu", dtype="float32")


@pytest.mark.parametrize("model", ["tiny_lm", "llama_lm"])
@pytest.mark.parametrize("opts", [
    GenerationOptions(greedy=True),
    GenerationOptions(greedy=True, min_new_tokens=12),
    GenerationOptions(greedy=True, repetition_penalty=1.3, no_repeat_ngram_size=2),
], ids=["plain", "min-new-tokens", "penalties"])
def test_greedy_tokens_equal_generate(request, model, opts):
    import torch

    tiny_lm = request.getfixturevalue(model)
    config = build_generation_config(tiny_lm, opts)
    run = decode.runner(tiny_lm, config, rows=1)
    assert run is not None  # nlgen's loop, compared with generate() below
    for prompt in PROMPTS:
        ids, mask = _ids(tiny_lm, prompt)
        with torch.inference_mode():
            expected = tiny_lm.model.generate(input_ids=ids, attention_mask=mask,
                                              generation_config=config, max_new_tokens=16)
            got = run(input_ids=ids, attention_mask=mask, generation_config=config,
                      max_new_tokens=16)
        assert got.tolist() == expected.tolist(), prompt


def test_stops_at_eos_like_generate(tiny_lm):
    import torch

    config = build_generation_config(tiny_lm, GenerationOptions(greedy=True))
    ids, mask = _ids(tiny_lm, PROMPTS[0])
    with torch.inference_mode():
        first = decode.runner(tiny_lm, config, rows=1)(
            input_ids=ids, attention_mask=mask, max_new_tokens=3)
    # Make the model's third greedy token the EOS: generation must end right after it.
    config.eos_token_id = int(first[0, -1])
    with torch.inference_mode():
        out = decode.runner(tiny_lm, config, rows=1)(
            input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert out.shape[1] <= ids.shape[1] + 3 and int(out[0, -1]) == config.eos_token_id


def test_sampling_with_a_fixed_seed_is_reproducible(tiny_lm):
    import torch

    config = build_generation_config(tiny_lm, GenerationOptions())  # GPT-2 style sampling
    run = decode.runner(tiny_lm, config, rows=1)
    assert run is not None
    ids, mask = _ids(tiny_lm, PROMPTS[0])
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with torch.inference_mode():
            outs.append(run(input_ids=ids, attention_mask=mask, max_new_tokens=20).tolist())
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("fields", [
    {"top_k": 50, "top_p": 0.95},
    {"top_k": 0, "top_p": 0.5, "temperature": 0.7},
    {"top_k": 5, "top_p": 1.0, "temperature": 1.5},
])
def test_warp_is_generates_warped_distribution(fields):
    import torch
    from transformers import GenerationConfig

    from nlgen.engine.sampling import build_warpers

    config = GenerationConfig(do_sample=True, **fields)
    torch.manual_seed(0)
    scores = torch.randn(1, 400) * 3
    scores[0, :8] = scores[0, 8]  # ties, at the top-k boundary for small k
    expected = build_warpers(config)(None, scores.clone()).softmax(dim=-1)[0]  # (V,)
    probs, indices = decode.warp(scores, config)
    got = torch.zeros_like(expected).index_put_((indices,), probs)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("rows,seeded,opts", [
    (2, False, GenerationOptions(greedy=True)),
    (1, True, GenerationOptions()),
    (1, False, GenerationOptions(num_beams=2)),
    (1, False, GenerationOptions(num_return_sequences=2)),
    (1, False, GenerationOptions(typical_p=0.9)),
    (1, False, GenerationOptions(max_time=5.0)),
    (1, False, GenerationOptions(extra=(("output_scores", True),
                                        ("return_dict_in_generate", True)))),
], ids=["batch", "seed", "beams", "sequences", "typical", "max-time", "scores"])
def test_other_requests_keep_generate(tiny_lm, rows, seeded, opts):
    config = build_generation_config(tiny_lm, opts)
    assert decode.runner(tiny_lm, config, rows=rows, seeded=seeded) is None


def test_logprobs_and_seeded_sampling_keep_generate_but_seeded_greedy_does_not(tiny_lm):
    sampled = build_generation_config(tiny_lm, GenerationOptions(seed=3))
    greedy = build_generation_config(tiny_lm, GenerationOptions(greedy=True, seed=3))
    assert decode.runner(tiny_lm, greedy, rows=1, logprobs=True) is None
    assert decode.runner(tiny_lm, sampled, rows=1, seeded=True) is None
    assert decode.runner(tiny_lm, greedy, rows=1, seeded=True) is not None


def test_generate_takes_the_lean_loop_for_one_prompt(tiny_lm, monkeypatch):
    calls = []
    real = decode.decode

    def spy(*args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode", spy)
    opts = GenerationOptions(greedy=True, max_new_tokens=7)
    [one] = generate(tiny_lm, ["The quick"], opts)
    two = list(generate(tiny_lm, ["The quick", "Once"], opts))
    assert calls == [7] and two[0].completion == one.completion
