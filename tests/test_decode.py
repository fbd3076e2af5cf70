"""nlgen.engine.decode: nlgen's loop gives generate()'s tokens (greedy, and seeded sampling,
single and in batches) and its distribution."""

from __future__ import annotations

import pytest

from nlgen.engine import choosing, decode
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
    probs, indices = choosing.warp(scores, config)
    got = torch.zeros_like(expected).index_put_((indices,), probs)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("opts", [
    GenerationOptions(num_beams=2),
    GenerationOptions(max_time=5.0),
    GenerationOptions(extra=(("output_scores", True), ("return_dict_in_generate", True))),
], ids=["beams", "max-time", "scores"])
def test_other_requests_keep_generate(tiny_lm, opts):
    config = build_generation_config(tiny_lm, opts)
    assert decode.runner(tiny_lm, config, rows=1) is None


@pytest.mark.parametrize("opts", [
    GenerationOptions(greedy=True), GenerationOptions(seed=3),
    GenerationOptions(num_return_sequences=2), GenerationOptions(typical_p=0.9),
    GenerationOptions(min_p=0.05), GenerationOptions(greedy=True, logprobs=2),
], ids=["batch", "seed", "sequences", "typical", "min-p", "logprobs"])
def test_batches_seeds_sequences_and_all_warpers_take_the_lean_loop(tiny_lm, opts):
    config = build_generation_config(tiny_lm, opts)
    assert decode.runner(tiny_lm, config, rows=3, seed=opts.seed) is not None


def _batch(lm, prompts):
    lm.tokenizer.padding_side = "left"
    encoded = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("model", ["tiny_lm", "llama_lm"])
@pytest.mark.parametrize("opts", [
    GenerationOptions(greedy=True, repetition_penalty=1.2),
    GenerationOptions(seed=11, num_return_sequences=2),
    GenerationOptions(seed=5, top_k=0, top_p=0.8, temperature=0.9, no_repeat_ngram_size=3),
    GenerationOptions(seed=2, min_p=0.02, typical_p=0.95),
], ids=["greedy", "seeded-n2", "seeded-top-p", "seeded-min-p-typical"])
def test_a_batch_gives_each_prompt_its_own_tokens_as_seeded_generate(request, model, opts):
    """Each prompt of a left-padded batch gets, from nlgen's loop, the tokens nlgen's seeded
    generate() gives it alone (float32): the same processors, warpers and random stream."""
    import torch

    from nlgen.engine.sampling import seeded_generate

    lm = request.getfixturevalue(model)
    config = build_generation_config(lm, opts)
    ids, mask = _batch(lm, PROMPTS)
    run = decode.runner(lm, config, rows=len(PROMPTS), seed=opts.seed, indices=[4, 7, 9])
    with torch.inference_mode():
        got = run(input_ids=ids, attention_mask=mask, generation_config=config,
                  max_new_tokens=24)
    n = opts.num_return_sequences
    for b, (index, prompt) in enumerate(zip([4, 7, 9], PROMPTS)):
        alone, alone_mask = _ids(lm, prompt)
        with torch.inference_mode():
            want = seeded_generate(lm.model, alone, alone_mask, generation_config=config,
                                   seed=opts.seed, indices=[index], max_new_tokens=24)
        for s in range(n):
            new = got[b * n + s, ids.shape[1]:].tolist()
            expected = want[s, alone.shape[1]:].tolist()
            pad = config.pad_token_id
            assert new[:len(expected)] == expected, (prompt, s)
            assert all(t == pad for t in new[len(expected):])


def test_logprobs_come_from_the_raw_logits_as_generate_gives_them(tiny_lm):
    import torch

    config = build_generation_config(tiny_lm, GenerationOptions(greedy=True))
    ids, mask = _batch(tiny_lm, PROMPTS)
    run = decode.runner(tiny_lm, config, rows=len(PROMPTS))
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6,
              "output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        got = run(generation_config=config, **kwargs)
        want = tiny_lm.model.generate(generation_config=config, **kwargs)
    assert got.sequences.tolist() == want.sequences.tolist()
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_generate_takes_the_lean_loop_for_prompts_and_batches(tiny_lm, monkeypatch):
    calls = []
    real = decode.decode

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode", spy)
    opts = GenerationOptions(greedy=True, max_new_tokens=7)
    [one] = generate(tiny_lm, ["The quick"], opts)
    two = list(generate(tiny_lm, ["The quick", "Once"], opts))
    assert calls == [1, 2] and two[0].completion == one.completion
