"""nlgen.models.capabilities: the private torch ops the engine uses are probed once; where one
is missing, the engine takes the plain path (the same numbers) or keeps weights dense, with a
notice under -v, never an error the user did not ask for."""

from __future__ import annotations

import logging

import pytest

from nlgen.errors import UsageError
from nlgen.models import capabilities, quantized


def test_this_torch_has_both():
    # The torch the tests pin (pyproject.toml) has both; a probe that fails here is a bug.
    assert capabilities.sdpa_gqa() is True
    assert capabilities.int4_kernels() is None


def test_without_int4_kernels_auto_keeps_the_weights_dense(monkeypatch, caplog):
    monkeypatch.setattr(capabilities, "int4_kernels", lambda: "torch 9.9 has no CPU int4 kernels")
    with caplog.at_level(logging.INFO, logger="nlgen"):
        kind = quantized.choose("auto", device="cpu", dtype="bfloat16", cacheable=True)
    assert kind == "none"
    assert "not quantized: torch 9.9 has no CPU int4 kernels" in caplog.text


def test_without_int4_kernels_an_explicit_int4_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(capabilities, "int4_kernels", lambda: "torch 9.9 has no CPU int4 kernels")
    with pytest.raises(UsageError, match="--quantize int4 is not available: torch 9.9"):
        quantized.choose("int4", device="cpu", dtype="bfloat16", cacheable=True)
    # int8 runs through another kernel: not refused for the int4 one's absence
    assert quantized.choose("int8", device="cpu", dtype="bfloat16", cacheable=True) == "int8"


def test_attention_without_enable_gqa_gives_the_same_numbers(monkeypatch):
    import torch

    from nlgen.engine import lean_llama

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=generator)  # 6 query heads
    k = torch.randn(2, 2, 5, 8, generator=generator)  # 2 k/v heads
    v = torch.randn(2, 2, 5, 8, generator=generator)
    with_flag = lean_llama.sdpa(q, k, v, mask=None, scale=8 ** -0.5, causal=True)
    monkeypatch.setattr(capabilities, "sdpa_gqa", lambda: False)
    repeated = lean_llama.sdpa(q, k, v, mask=None, scale=8 ** -0.5, causal=True)
    assert torch.allclose(with_flag, repeated, atol=1e-6)


def test_the_packed_bfloat16_check_sees_another_order_of_additions():
    """The check behind nlgen.engine.packed: where torch's plain product is oneDNN's too, the
    packed one adds in its order (any shape of real models); where torch leaves a product of
    at most 16^3 multiplications to its own kernel, the sums differ and the check says so (a
    64 x 64 layer at one row). With oneDNN switched off, every shape differs."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16")
    matches = capabilities.packed_bf16_matches.__wrapped__  # not the per-process memo
    assert not matches((64,), 64, False, "Linear")  # torch's own kernel, on any CPU
    why = capabilities.packed_bf16()
    if why is not None:  # another CPU's oneDNN: nothing is packed there, and that is all
        pytest.skip(why)
    assert matches((576,), 576, False, "Linear")
    assert matches((576, 192, 192), 576, True, "Linear")  # q/k/v side by side, with biases
    assert matches((2304,), 768, True, "Conv1D")
    torch.backends.mkldnn.enabled = False
    try:
        assert not matches((576,), 576, False, "Linear")
    finally:
        torch.backends.mkldnn.enabled = True
