"""nlgen.models.quantized: int4 blocks reproduce 4-bit weights exactly, the cache, its scope."""

from __future__ import annotations

import os

import pytest

from nlgen.engine.generation import GenerationOptions, generate
from nlgen.errors import UsageError
from nlgen.models import quantized


def _on_q4_grid(weight):
    """Put a weight on GGUF Q4_1's grid: per block of 32, low + scale * q with q in 0..15."""
    import torch

    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // 32, 32)
    low = blocks.amin(-1, keepdim=True).half().float()  # GGUF stores both in float16
    scale = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
    q = torch.round((blocks - low) / scale).clamp(0, 15)
    return (low + scale * q).reshape(n, k)


def test_int4_blocks_find_a_q4_grid_exactly_and_the_kernel_computes_it():
    import torch

    torch.manual_seed(0)
    weight = _on_q4_grid(torch.randn(96, 64))
    blocks = quantized.int4_blocks(weight)
    assert blocks["exact"] and blocks["codes"].shape == (96, 32)
    assert not quantized.int4_blocks(torch.randn(96, 64))["exact"]
    int4, _, _ = quantized._classes()
    x = torch.randn(3, 5, 64)
    layer = int4(blocks, weight.bfloat16())
    got = layer(x.bfloat16()).float()  # (3, 5, 96): 15 rows, the int4 kernel
    expected = x.bfloat16().float() @ weight.T  # the same bfloat16 input, exact weights
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()
    many = torch.randn(quantized.DENSE_FROM, 64).bfloat16()  # enough rows: the dense product
    assert torch.equal(layer(many), torch.nn.functional.linear(many, weight.bfloat16()))


def _on_q8_grid(weight):
    """Put a weight on GGUF Q8_0's grid: per block of 32, d * q with q in -127..127."""
    import torch

    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()  # float16 in the file
    return (d * torch.round(blocks / d).clamp(-127, 127)).reshape(n, k)


def test_int8_blocks_hold_a_q8_grid_as_two_int4_halves():
    import torch

    torch.manual_seed(0)
    weight = _on_q8_grid(torch.randn(128, 64))
    parts = quantized.int8_blocks(weight)
    assert parts.pop("exact") and not quantized.int8_blocks(torch.randn(128, 64))["exact"]
    layer = quantized.module_for(parts, weight.bfloat16())
    x = torch.randn(3, 64).bfloat16()
    expected = x.float() @ weight.T  # exact weights, the same bfloat16 input
    got = layer(x).float()  # 3 rows: the two int4 products
    # Only the scales' bfloat16 rounding (2^-9) and the outputs' bfloat16 rounding remain.
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()
    # The halves rebuild the weight: high 16d * hi - 128d plus low d * lo.
    def rebuild(half):
        codes = parts[f"{half}_codes"]
        q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(128, 64).float()
        scale = parts[f"{half}_scale"].repeat_interleave(32, dim=1)
        return q * scale + parts[f"{half}_low"].repeat_interleave(32, dim=1)
    d = (weight.reshape(128, 2, 32).abs().amax(-1) / 127)
    rounding = (d - d.bfloat16().float()).abs().max() * 128  # |q| <= 128 times d's rounding
    assert (rebuild("high") + rebuild("low") - weight).abs().max() <= rounding + 1e-6


def test_int8_rows_round_trip():
    import torch

    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    rows = quantized.int8_rows(weight)
    rebuilt = rows["int8"].float() * rows["scale"][:, None]
    assert (rebuilt - weight).abs().max() <= rows["scale"].max() / 2 + 1e-6
    _, int8, _ = quantized._classes()
    x = torch.randn(2, 64)
    expected = x.bfloat16().float() @ weight.T
    got = int8(rows, weight.bfloat16())(x.bfloat16()).float()
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def _tiny_llama_on_grid(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    for name in quantized.linear_names(model)[:-1]:  # the LM head: 8-bit blocks, as GGUF's
        linear = model.get_submodule(name)
        linear.weight.data = _on_q4_grid(linear.weight)
    model.get_output_embeddings().weight.data = _on_q8_grid(model.get_output_embeddings().weight)
    return model


def test_auto_quantizes_4bit_weights_and_caches_them(tiny_llama, tmp_path, monkeypatch):
    import torch

    model = _tiny_llama_on_grid(tiny_llama)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        reference = model(ids).logits
    assert quantized.quantize_model(model, "auto", cache=tmp_path) == "int4"
    assert (tmp_path / quantized.CACHE_FILE).is_file()
    assert type(model.get_output_embeddings()).__name__ == "Int8BlocksLinear"  # the Q8_0 head
    model.to(torch.bfloat16)
    with torch.inference_mode():
        logits = model(ids).logits.float()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75
    with torch.inference_mode():  # a batch's last positions: a strided slice for the LM head
        last = model(torch.tensor([[5, 9, 2, 7], [1, 2, 3, 4]]), logits_to_keep=1).logits
    assert torch.equal(last[:1].float(), logits[:, -1:])
    # The cache holds what the kernel runs: packed int4, for this torch version only.
    state, exact = quantized.load_cached(tmp_path / quantized.CACHE_FILE)
    assert exact and any(k.endswith(".packed") for k in state)
    assert not any(k.endswith("codes") for k in state)
    monkeypatch.setattr(quantized, "_torch_version", lambda: "0.0")
    assert quantized.load_cached(tmp_path / quantized.CACHE_FILE) is None
    monkeypatch.undo()
    # A second load reads the cache: the same modules without computing anything again.
    monkeypatch.setattr(quantized, "quantize_state", lambda *a: pytest.fail("not cached"))
    again = _tiny_llama_on_grid(tiny_llama)
    assert quantized.quantize_model(again, "auto", cache=tmp_path) == "int4"
    again.to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(again(ids).logits.float(), logits)


def test_auto_leaves_weights_that_are_not_4bit_alone(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # random float weights
    assert quantized.quantize_model(model, "auto", cache=tmp_path) == "none"
    assert not any(type(m).__name__.startswith("Int") for m in model.modules())


def test_choose():
    auto = {"device": "cpu", "dtype": "bfloat16", "cacheable": True}
    assert quantized.choose("auto", **auto) == "auto"
    assert quantized.choose("auto", **{**auto, "cacheable": False}) == "none"
    assert quantized.choose("auto", **{**auto, "dtype": "float32"}) == "none"
    assert quantized.choose("auto", **{**auto, "device": "cuda:0"}) == "none"
    assert quantized.choose("none", **auto) == "none"
    assert quantized.choose("int8", **{**auto, "cacheable": False}) == "int8"
    with pytest.raises(UsageError, match="CPU only"):
        quantized.choose("int4", **{**auto, "device": "cuda:0"})
    with pytest.raises(UsageError, match="bfloat16"):
        quantized.choose("int8", **{**auto, "dtype": "float32"})
    with pytest.raises(UsageError, match="invalid --quantize"):
        quantized.check_kind("int3")


def test_load_model_quantize_int8_generates(tiny_llama):
    from nlgen.models.loading import load_model

    lm = load_model(str(tiny_llama), device="cpu", quantize="int8")
    assert (lm.quantization, lm.dtype) == ("int8", "bfloat16")
    [result] = generate(lm, ["The quick"], GenerationOptions(greedy=True, max_new_tokens=5))
    assert result.completion_tokens == 5
    plain = load_model(str(tiny_llama), device="cpu", dtype="float32")  # auto: not a GGUF copy
    assert plain.quantization == "none"


def test_the_int4_cache_survives_a_full_disk_and_a_killed_writer(tmp_path, monkeypatch, caplog):
    """A full disk while caching is a notice (the weights are in memory), never a crash, and
    leaves no temporary; a temporary whose writer was killed is removed by the next write."""
    import subprocess
    import sys

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    path = tmp_path / quantized.CACHE_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"{path.name}.tmp-{dead}-abc"
    stale.write_bytes(b"half a file")
    mine = tmp_path / f"{path.name}.tmp-{os.getpid()}-live"
    mine.write_bytes(b"being written")

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with caplog.at_level("WARNING", logger="nlgen"):
        quantized.save_cached(path, {"w": torch.zeros(2)}, exact=True)
    assert "could not cache the quantized weights" in caplog.text
    assert not stale.exists() and mine.exists()  # the dead writer's, not a live one's
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
