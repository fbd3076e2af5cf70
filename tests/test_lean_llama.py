"""nlgen.engine.lean_llama: the lean forward computes what transformers' Llama forward computes."""

from __future__ import annotations

import pytest

from nlgen.engine import decode, lean_llama, lean_weights
from nlgen.engine.options import GenerationOptions
from nlgen.engine.sampling import build_generation_config
from nlgen.models import quantized

PROMPTS = ["The quick brown fox", "Once upon a time", "A"]


def _greedy(lm, prompt, n, *, lean):
    """Greedy tokens: nlgen's loop on the lean forward (lean=True), or transformers' generate()
    on the model (which is built for it; the lean weights ``lm`` held are kept)."""
    import torch

    config = build_generation_config(lm, GenerationOptions(greedy=True))
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    weights = lm.lean
    with torch.inference_mode():
        if lean:
            out = decode.runner(lm, config, rows=1, engine="nlgen")(
                input_ids=ids, max_new_tokens=n)
        else:
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    generation_config=config, max_new_tokens=n)
            lm.lean = weights  # building the model let the files' copy go: keep comparing it
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llama_lm(tiny_llama):
    from nlgen.models.loading import load_model

    return load_model(str(tiny_llama), device="cpu", dtype="float32",
                      lean_reader=lean_weights.read)


def test_reason_names_the_architecture_or_the_config_key(llama_lm, tiny_lm):
    assert lean_llama.reason(llama_lm.model) is None
    assert lean_llama.reason(tiny_lm.model) == "architecture GPT2LMHeadModel"
    config = llama_lm.model.config
    saved = dict(config.rope_parameters)
    try:
        config.rope_parameters = {**saved, "rope_type": "dynamic", "factor": 2.0}
        assert lean_llama.reason(llama_lm.model) == "config rope_type 'dynamic'"
    finally:
        config.rope_parameters = saved


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_generate_float32(llama_lm, prompt):
    assert _greedy(llama_lm, prompt, 24, lean=True) == _greedy(llama_lm, prompt, 24, lean=False)


def test_int4_fused_products_equal_the_separate_ones_and_greedy_tokens_match(tiny_llama,
                                                                            tmp_path):
    """int4 weights in bfloat16: fused q/k/v and gate/up give the separate layers' numbers."""
    import torch

    from nlgen.models.loading import load_model
    from tests.test_quantized import _on_q4_grid

    lm = load_model(str(tiny_llama), device="cpu", quantize="int8")  # bfloat16, int8 layers
    layer = lm.model.model.layers[0].self_attn
    fused = lean_weights.fuse([layer.q_proj, layer.k_proj, layer.v_proj])
    x = torch.randn(1, 3, layer.q_proj.in_features).bfloat16()
    expected = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], dim=-1)
    assert torch.equal(fused(x), expected)
    # int4: put the tiny model's weights on a Q4 grid, quantize them, compare both loops.
    int4, int8, _ = quantized._classes()
    names = [n for n, m in lm.model.named_modules() if isinstance(m, int8) and "lm_head" not in n]
    assert len(names) == 2 * 7  # every Linear of the 2 layers
    for name in names:
        module = lm.model.get_submodule(name)
        weight = _on_q4_grid(module.dense.float())
        parent, _, child = name.rpartition(".")
        setattr(lm.model.get_submodule(parent), child,
                int4(quantized.int4_blocks(weight), weight.bfloat16()))
    mlp = lm.model.model.layers[0].mlp
    # k/v are 32 rows wide here, half of the int4 kernel's tile: those cannot be fused.
    assert lean_weights.fuse([layer.q_proj, layer.k_proj, layer.v_proj]) is None
    fused = lean_weights.fuse([mlp.gate_proj, mlp.up_proj])  # 128 + 128 rows
    assert torch.equal(fused(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1))
    mixed = [mlp.gate_proj, int8(quantized.int8_rows(mlp.up_proj.dense.float()),
                                 mlp.up_proj.dense)]
    assert lean_weights.fuse(mixed) is None
    for prompt in PROMPTS:
        assert _greedy(lm, prompt, 20, lean=True) == _greedy(lm, prompt, 20, lean=False)


@pytest.mark.slow
def test_builtin_default_load_runs_int4_and_the_lean_forward_gives_its_greedy_text():
    from nlgen.models.loading import load_model

    lm = load_model("builtin", device="cpu", lean_reader=lean_weights.read)
    if lm.dtype != "bfloat16":
        pytest.skip("this CPU has no fast bfloat16: auto keeps float32, no int4")
    files = lm.lean  # read from the files and the int4 cache (None when the cache was made now)
    assert lm.quantization == "int4" and lean_llama.supports(lm.model)
    lm.lean = files  # compare the files' weights with generate() on the model
    prompt = "The history of the printing press"
    assert _greedy(lm, prompt, 48, lean=True) == _greedy(lm, prompt, 48, lean=False)
    # A small batch runs transformers' generate() on the same int4 layers and 8-bit head.
    from nlgen.engine.generation import generate

    batch = list(generate(lm, [prompt, "Once upon a time", "A"],
                          GenerationOptions(greedy=True, max_new_tokens=6, min_new_tokens=6)))
    assert [r.completion_tokens for r in batch] == [6, 6, 6]


def test_a_saved_llama_loads_lean_and_builds_transformers_model_only_when_asked(tiny_llama):
    from nlgen.engine.generation import generate
    from nlgen.models.loading import load_model

    lm = load_model(str(tiny_llama), device="cpu", dtype="float32",
                      lean_reader=lean_weights.read)
    assert lm.lean is not None and lm._model is None
    opts = GenerationOptions(greedy=True, max_new_tokens=12)
    [one] = generate(lm, ["Once upon a time"], opts)
    assert lm._model is None  # one prompt: the lean loop, no transformers model
    lean_context, lean_config = lm.context_length, lm.generation_config.to_dict()
    assert lean_context == lm.model.config.max_position_embeddings  # built from here on
    assert lean_config == lm.model.generation_config.to_dict()
    assert lm.lean is None  # the copy read from the files is let go once the model holds them
    both = list(generate(lm, ["Once upon a time", "A"], opts))  # a batch: generate()
    assert both[0].completion == one.completion


def test_lean_files_forward_equals_transformers_forward(tiny_llama):
    import torch

    from nlgen.models.loading import load_model

    lm = load_model(str(tiny_llama), device="cpu", dtype="float32",
                      lean_reader=lean_weights.read)
    files = lm.lean  # read from the files; dropped when the model is built below
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    with torch.inference_mode():
        expected = lm.model(ids).logits[:, -1].float()
        got = lean_llama.LeanLlama(files, max_len=5).step(ids, 0)
    lm.lean = files  # the greedy runs below: the files' weights against the model's forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for prompt in PROMPTS:
        assert _greedy(lm, prompt, 24, lean=True) == _greedy(lm, prompt, 24, lean=False)


def test_a_cached_llama_is_kept_in_its_dtype_and_read_back_memory_mapped(tiny_llama, tmp_path):
    """With nlgen's own cache directory, the first read converts the float32 file and keeps a
    bfloat16 copy; later reads take the copy as it is (its tensors are the file's pages, not
    copies); a changed source file makes the copy stale, and it is made again."""
    import os

    import torch

    cache = tmp_path / "cache"
    cache.mkdir()
    copy = cache / "model-bfloat16.safetensors"
    first = lean_weights.from_files(tiny_llama, "bfloat16", None, cache)
    assert copy.is_file()
    assert lean_weights._in_dtype(tiny_llama / "model.safetensors", "bfloat16", cache) == copy
    second = lean_weights.from_files(tiny_llama, "bfloat16", None, cache)
    assert torch.equal(first.embed, second.embed) and second.embed.dtype == torch.bfloat16
    for a, b in zip(first.layers, second.layers, strict=True):
        assert torch.equal(a.q_proj.weight, b.q_proj.weight)
        assert torch.equal(a.down_proj.weight, b.down_proj.weight)
    # Memory-mapped: the storage is the file's pages (torch's own allocations are resizable).
    assert not second.embed.untyped_storage().resizable()
    assert not second.layers[0].q_proj.weight.untyped_storage().resizable()
    assert first.embed.untyped_storage().resizable()  # converted from float32: a copy
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    with torch.inference_mode():
        torch.testing.assert_close(lean_llama.LeanLlama(second, 5).step(ids, 0),
                                   lean_llama.LeanLlama(first, 5).step(ids, 0), rtol=0, atol=0)
    source = tiny_llama / "model.safetensors"
    stat = source.stat()
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert lean_weights._in_dtype(source, "bfloat16", cache) is None  # stale
        lean_weights.from_files(tiny_llama, "bfloat16", None, cache)
        assert lean_weights._in_dtype(source, "bfloat16", cache) == copy  # made again
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # A saved directory of the user's own (no cache) is only read.
    lean_weights.from_files(tiny_llama, "bfloat16", None)
    assert not (tiny_llama / "model-bfloat16.safetensors").exists()


def test_the_quantized_cache_read_in_pieces_is_the_whole_state(tmp_path, monkeypatch):
    import torch

    torch.manual_seed(0)
    state = {f"layer{i}.{part}": torch.randint(0, 255, (64, 32 + i), dtype=torch.uint8)
             for i in range(5) for part in ("packed", "scales")}
    path = tmp_path / quantized.CACHE_FILE
    quantized.save_cached(path, state, exact=True)
    monkeypatch.setattr(quantized, "CLONE_PIECE", 3000)  # a piece holds one or two tensors
    got, exact = quantized.load_cached(path)
    assert exact and set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value) and got[key].data_ptr() % 64 == 0


def test_one_sequence_keeps_bfloat16_keys_in_float32_and_several_slots_in_bfloat16():
    """The same attention either way (bfloat16 converts to float32 exactly): one slot stores
    float32 (no conversion a step), several slots keep the model's dtype (half the memory)."""
    import torch

    one = lean_llama.KVCache(2, 1, 8, 4, torch.bfloat16)
    many = lean_llama.KVCache(2, 1, 8, 4, torch.bfloat16, slots=3)
    plain = lean_llama.KVCache(2, 1, 8, 4, torch.float32, slots=3)
    assert (one.keys.dtype, many.keys.dtype, plain.values.dtype) == (
        torch.float32, torch.bfloat16, torch.float32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g).to(torch.bfloat16) for _ in range(3))
    k, v = k[:, :1], v[:, :1]  # one KV head for two query heads
    for cache in (one, many):
        got = [cache.attend(i, q, k, v, 0, None, 0.5) for i in range(2)]
        assert got[0].dtype == torch.bfloat16
    assert torch.equal(one.attend(0, q, k, v, 0, None, 0.5),
                       many.attend(0, q, k, v, 0, None, 0.5))
