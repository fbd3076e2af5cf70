"""What this torch can do for the engine, probed once on tiny inputs.

The lean forwards use three things that torch does not promise across releases: grouped-query
attention inside ``scaled_dot_product_attention`` (its ``enable_gqa`` flag, torch >= 2.5), the
private CPU int4 kernels (``_convert_weight_to_int4pack_for_cpu`` and
``_weight_int4pack_mm_for_cpu``) that nlgen.models.quantized packs weights for, and oneDNN's
bfloat16 weights laid out in its own blocks (``mkldnn._reorder_linear_weight`` and
``mkldnn._linear_pointwise``, nlgen.engine.packed). Each is tried once per process, on small
inputs, and compared with the plain computation; where it is missing or gives other numbers,
the engine repeats k/v heads instead (the same numbers), keeps the weights dense
(nlgen.models.quantized) or keeps the plain bfloat16 products, with a -v notice, never an
error.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import functools
import logging

from nlgen.errors import first_line

log = logging.getLogger("nlgen")


@functools.cache
def sdpa_gqa() -> bool:
    """Whether ``scaled_dot_product_attention(..., enable_gqa=True)`` works and equals the
    attention over k/v repeated per query head."""
    import torch
    import torch.nn.functional as F

    try:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 3, 8, generator=generator)
        k = torch.randn(1, 2, 3, 8, generator=generator)
        v = torch.randn(1, 2, 3, 8, generator=generator)
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1),
                                              v.repeat_interleave(2, dim=1), is_causal=True)
        ok = bool(torch.allclose(got, want, atol=1e-5))
    except (TypeError, RuntimeError) as exc:  # an older torch: no such flag
        log.info("engine: attention repeats k/v heads (this torch's SDPA has no enable_gqa: "
                 "%s)", first_line(exc))
        return False
    if not ok:
        log.info("engine: attention repeats k/v heads (SDPA's enable_gqa gave other numbers)")
    return ok


@functools.cache
def int4_kernels() -> str | None:
    """None when torch's CPU int4 kernels pack and multiply a small weight correctly; else why
    not (nlgen.models.quantized then keeps the weights dense)."""
    import torch

    try:
        pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    except (AttributeError, RuntimeError):
        return f"torch {torch.__version__} has no CPU int4 kernels"
    try:
        out_features, in_features, group = 64, 64, 32
        generator = torch.Generator().manual_seed(0)
        values = torch.randint(0, 16, (out_features, in_features), generator=generator,
                               dtype=torch.int32)  # 4-bit codes
        scales = torch.rand(in_features // group, out_features, generator=generator) + 0.5
        zeros = torch.rand(in_features // group, out_features, generator=generator)
        scales_zeros = torch.stack([scales, zeros], dim=2).to(torch.bfloat16)  # (K/G, N, 2)
        packed = pack(values, 1)
        x = torch.randn(2, in_features, generator=generator).to(torch.bfloat16)
        got = mm(x, packed, group, scales_zeros).float()  # (2, N)
        # The kernel's dequantization: w = (code - 8) * scale + zero, per group of inputs.
        s = scales_zeros[..., 0].float().repeat_interleave(group, dim=0).T  # (N, K)
        z = scales_zeros[..., 1].float().repeat_interleave(group, dim=0).T
        weight = (values.float() - 8) * s + z  # (N, K)
        want = x.float() @ weight.T
        if not torch.allclose(got, want, rtol=2e-2, atol=0.5):
            return "torch's CPU int4 kernel gave other numbers than its dequantized weight"
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"torch's CPU int4 kernels failed on a test weight ({first_line(exc)})"
    return None


@functools.cache
def packed_bf16() -> str | None:
    """None when oneDNN's packed bfloat16 products are here and give the plain products' bits
    on this machine (:func:`packed_bf16_matches` at one shape); else why not
    (nlgen.engine.packed then leaves the weights as they are)."""
    import torch

    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight",
                                                        "_linear_pointwise")):
        return f"torch {torch.__version__} has no packed oneDNN products"
    try:
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return "this CPU or torch build has no oneDNN bfloat16"
        if not packed_bf16_matches((96,), 256, True, "Linear"):
            return "oneDNN's packed bfloat16 product adds in another order than the plain one"
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"oneDNN's packed bfloat16 product failed on a test weight ({first_line(exc)})"
    return None


@functools.cache
def packed_bf16_matches(widths: tuple[int, ...], in_features: int, bias: bool,
                        kind: str) -> bool:
    """Whether one packed product of layers ``widths`` wide side by side (one layer, or q/k/v
    joined) gives the plain products' bits, for 1 row and for 9, on this machine.

    Checked on weights of these shapes made of 0s and 1s and rows holding 2^24, 1 and -2^24:
    their sum in float32 is 0 or 1 depending on the order of the additions, so a kernel that
    adds in another order gives other values in many places. (torch's own ``addmm`` leaves
    products of fewer than 16^3 multiplications to another kernel than oneDNN's, whose sums
    differ in a few ulps now and then: such layers stay plain.) ``kind``: "Linear" compares
    with ``linear(x, W, b)``, "Conv1D" with transformers' ``addmm(b, x, W^T)``."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    # (N, K) of 0s and 1s: 11 rows, each its own pattern, repeated (cheap for a 50k-row head).
    base = ((torch.arange(11)[:, None] * 7 + torch.arange(in_features)[None, :] * 3) % 11
            != 0).to(torch.bfloat16)
    weights = [base[torch.arange(n) % 11] for n in widths]
    biases = [torch.randn(n, generator=generator).to(torch.bfloat16) if bias else None
              for n in widths]
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), 1)
    joined_bias = torch.cat(biases) if bias else None  # type: ignore[arg-type]
    for rows in (1, 9):
        x = torch.zeros(rows, in_features)
        for r in range(rows):
            i, j, k = torch.randperm(in_features, generator=generator)[:3].tolist()
            x[r, i], x[r, j], x[r, k] = 2.0 ** 24, 1.0, -(2.0 ** 24)
        x = x.to(torch.bfloat16)
        if kind == "Conv1D":
            plain = [torch.addmm(b, x, w.T.contiguous()) if b is not None
                     else x @ w.T.contiguous() for w, b in zip(weights, biases)]
        else:
            plain = [F.linear(x, w, b) for w, b in zip(weights, biases)]
        got = torch.ops.mkldnn._linear_pointwise(x, packed, joined_bias, "none", [], "")
        if not torch.equal(got, torch.cat(plain, dim=-1)):
            return False
    return True
