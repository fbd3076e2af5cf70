"""Weight-only quantization for generating on the CPU: int4 in blocks of 32, int8 per row.

Decoding one token reads every weight once, and on a small CPU that memory traffic is much of
the cost: SmolLM2-135M's weights are 540 MB in float32, 270 MB in bfloat16, ~100 MB as its
GGUF's int4 blocks and 8-bit LM head (README, "Benchmarks", for the speeds). The matrix
products run in torch's own CPU kernels (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``) on bfloat16 activations.

int4: each row of a Linear weight is cut into blocks of 32 and stored as ``low + scale * q``
with q in 0..15 (the layout of GGUF's Q4_1). The built-in model's weights come from a Q4_1 file,
so quantizing its float32 copy recovers the file's own q, scale and low exactly (``exact``): the
model that runs is the GGUF's, and the only drift from float32 comes from bfloat16 activations
and scales rounded to bfloat16 (measured: README, "Benchmarks"). Other models lose more. An LM
head on GGUF Q8_0's grid (8-bit blocks) is kept as those blocks, as two int4 products
(:func:`int8_blocks`); any other stays bfloat16 under int4.
int8 (on request): one scale per output row (symmetric) for every Linear, the LM head included,
and for GPT-2's Conv1D layers (the same product, their weight stored transposed).
Each layer keeps its dense bfloat16 weight too, for prompts and batches of DENSE_FROM rows or
more, where the dense product is the faster one (so batch throughput and prefill are those of
bfloat16; the memory is that of bfloat16 plus ~70 MB).

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from nlgen.errors import UsageError, write_failure
from nlgen.models import capabilities

log = logging.getLogger("nlgen")

GROUP = 32  # int4 block size, as GGUF's Q4_0 / Q4_1
KINDS = ("auto", "none", "int4", "int8")
# The cache file's format (4: int4 blocks packed for torch's kernel; 3: the LM head as 8-bit
# blocks when it is on them); another format, or another torch version, is recomputed.
FORMAT = "nlgen-quantized-4"
CACHE_FILE = "quantized-int4.safetensors"  # next to the converted float32 copy
# From this many rows (prompt tokens in a prefill, prompts in a batch) the dense bfloat16
# product is faster than the int4 kernel (M=16: 188 vs 174 us, M=32: 309 vs 351 us for a
# 1536x576 weight; M=1: 129 vs 29 us), so each layer keeps its dense weight as well.
DENSE_FROM = 16
# torch's CPU int4 packing lays out output rows in tiles of 64 (a fused product of layers whose
# widths are not multiples of it computes garbage: tests/test_lean_llama.py).
INT4_TILE = 64
CLONE_PIECE = 16 << 20  # bytes of a memory-mapped file copied between two unmappings


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"invalid --quantize {kind!r}", hint="use one of: " + ", ".join(KINDS))
    return kind


def choose(kind: str, *, device: str, dtype: str, cacheable: bool) -> str:
    """What a load will do: "none", "int4", "int8", or "auto" (int4 if the weights are 4-bit).

    "auto" considers only a GGUF model's converted copy (``cacheable``) computing in bfloat16 on
    the CPU; whether its weights really are 4-bit blocks is known once they are read.
    """
    if kind == "none":
        return "none"
    if kind == "auto":
        if not (cacheable and device == "cpu" and dtype == "bfloat16"):
            return "none"
        missing = capabilities.int4_kernels()
        if missing is not None:  # an older or newer torch: dense bfloat16 weights
            log.info("not quantized: %s; the weights stay bfloat16", missing)
            return "none"
        return "auto"
    if device != "cpu":
        raise UsageError(f"--quantize {kind} runs on the CPU only", hint="add --device cpu")
    if dtype != "bfloat16":
        raise UsageError(f"--quantize {kind} computes in bfloat16, not {dtype}",
                         hint="drop --dtype, or use --dtype bfloat16")
    missing = capabilities.int4_kernels() if kind == "int4" else None
    if missing is not None:
        raise UsageError(f"--quantize {kind} is not available: {missing}",
                         hint="use --quantize none, or a torch with them (see pyproject.toml)")
    return kind


def quantize_model(model: Any, kind: str, *, cache: Path | None = None) -> str:
    """Quantize a float32 model in place for :func:`choose`'s ``kind``; return what was done.

    ``cache``: the converted GGUF copy's directory, where the int4 tensors are kept so that
    later runs read them (~100 MB) instead of computing them again.
    """
    path = cache / CACHE_FILE if cache is not None and kind in ("auto", "int4") else None
    found = load_cached(path) if path is not None else None
    if found is None:
        state, exact = quantize_state(model, "int8" if kind == "int8" else "int4")
        found = packed_state(state), exact
        if path is not None:
            save_cached(path, *found)
    state, exact = found
    if kind == "auto" and not exact:
        log.debug("the weights are not 4-bit blocks: not quantized")
        return "none"
    apply(model, state)
    return "int8" if kind == "int8" else "int4"


# ----------------------------------------------------------------------------- arithmetic


def int4_blocks(weight: Any) -> dict[str, Any]:
    """(N, K) float weight -> codes (N, K/2) uint8 (two per byte, even column low), scale and
    low (N, K/GROUP) float32, and ``exact``: whether the weight was on that grid already."""
    import torch

    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // GROUP, GROUP)  # (N, K/G, G)
    low = blocks.amin(dim=-1)  # (N, K/G)
    scale = (blocks.amax(dim=-1) - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((blocks - low[..., None]) / safe[..., None]).clamp_(0, 15)  # (N, K/G, G)
    error = (q * scale[..., None] + low[..., None] - blocks).abs().amax(dim=-1)  # (N, K/G)
    # A weight already on the grid rebuilds to within float32 rounding of its own values.
    exact = bool((error <= 1e-3 * safe).all())
    q = q.to(torch.uint8).reshape(n, k)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
    return {"codes": codes.contiguous(), "scale": scale.contiguous(),
            "low": low.contiguous(), "exact": exact}


def int8_blocks(weight: Any) -> dict[str, Any]:
    """(N, K) float weight -> 8-bit blocks of GROUP (GGUF Q8_0: d * q, q in -127..127) held as
    two int4 block sets that add up to it, and ``exact``: whether it was on that grid.

    With u = q + 128 = 16 * hi + lo (hi, lo in 0..15): d * q = 16d * hi - 128d + d * lo. Both
    halves are int4 blocks (``high``: scale 16d, low -128d; ``low``: scale d, low 0), and with d
    rounded to bfloat16 their scales and zeros are exact in bfloat16 too: the only rounding is
    d's (float16 in the file), as for the int4 layers.
    """
    import torch

    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // GROUP, GROUP)  # (N, K/G, G)
    d = blocks.abs().amax(dim=-1) / 127  # (N, K/G): Q8_0 puts the largest value at +-127
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(blocks / safe[..., None]).clamp_(-128, 127)
    error = (q * d[..., None] - blocks).abs().amax(dim=-1)
    exact = bool((error <= 1e-3 * safe).all())
    u = (q + 128).to(torch.uint8).reshape(n, k)
    d = d.to(torch.bfloat16).float()
    out: dict[str, Any] = {"exact": exact}
    for half, nibble, scale, low in (("high", u >> 4, 16 * d, -128 * d),
                                     ("low", u & 15, d, torch.zeros_like(d))):
        out[f"{half}_codes"] = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).contiguous()
        out[f"{half}_scale"], out[f"{half}_low"] = scale.contiguous(), low.contiguous()
    return out


def int8_rows(weight: Any) -> dict[str, Any]:
    """(N, K) float weight -> int8 (N, K) and one float32 scale per row (N,)."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"int8": q.contiguous(), "scale": scale.contiguous()}


# ----------------------------------------------------------------------------- modules


def pack_int4(blocks: dict[str, Any]) -> tuple[Any, Any]:
    """int4 blocks -> the CPU kernel's packed codes (N, K/2) and its (K/G, N, 2) scales and
    zeros; blocks read from the cache are packed already (``packed``, ``scales_zeros``)."""
    import torch

    if "packed" in blocks:
        return blocks["packed"], blocks["scales_zeros"]
    codes = blocks["codes"]  # (N, K/2)
    q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    # The kernel computes (q - 8) * scale + zero, so zero = low + 8 * scale.
    scale, low = blocks["scale"], blocks["low"]  # (N, K/G)
    return packed, torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(
        torch.bfloat16).contiguous()


def packed_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its int4 blocks in the kernel's packed form, as the cache keeps them:
    packing 200 layers at every start cost ~0.3 s of the built-in model's load."""
    layers: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".")
        layers.setdefault(name, {})[part] = value
    out: dict[str, Any] = {}
    for name, parts in layers.items():
        if "int8" in parts:  # int8 rows: no packing
            out.update({f"{name}.{part}": value for part, value in parts.items()})
            continue
        for prefix in ("", "high_", "low_"):  # int4 blocks; the two halves of 8-bit blocks
            if f"{prefix}codes" in parts:
                blocks = {k: parts[prefix + k] for k in ("codes", "scale", "low")}
                out[f"{name}.{prefix}packed"], out[f"{name}.{prefix}scales_zeros"] = \
                    pack_int4(blocks)
    return out


@functools.cache
def _classes() -> tuple[type, type, type]:
    """The module classes (int4, int8, 8-bit blocks), made on first use so that importing this
    module imports no torch."""
    import torch

    class QuantizedLinear(torch.nn.Module):
        """y = x W^T + b, x in bfloat16 on the CPU: the quantized kernel for a few rows, the
        dense weight (kept too) from DENSE_FROM rows on, where the dense product is faster."""

        def __init__(self, dense: Any, bias: Any) -> None:
            super().__init__()
            self.out_features, self.in_features = dense.shape
            self.register_buffer("dense", dense.detach())  # cast with the model (bfloat16)
            self.bias = bias

        def forward(self, x: Any) -> Any:
            # (M, K), contiguous: the int4 kernel requires it, and torch 2.13's linear() on a
            # strided 3-D input (the LM head gets the last positions of a batch) with a weight
            # that needs no grad expands the weight per row: 1.7 s instead of 8 ms at 32 rows.
            rows = x.reshape(-1, self.in_features).contiguous()
            if rows.shape[0] >= DENSE_FROM:
                y = torch.nn.functional.linear(rows, self.dense, self.bias)
            else:
                y = self.product(rows)
                y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)

    class Int4Linear(QuantizedLinear):
        """W in int4 blocks of GROUP (torch's CPU int4pack kernel)."""

        def __init__(self, blocks: dict[str, Any], dense: Any, bias: Any = None) -> None:
            super().__init__(dense, bias)
            packed, scales_zeros = pack_int4(blocks)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_zeros", scales_zeros)

        def product(self, rows: Any) -> Any:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP,
                                                              self.scales_zeros)

    class Int8BlocksLinear(QuantizedLinear):
        """W in 8-bit blocks of GROUP (GGUF's Q8_0: d * q), as two int4 products: the high and
        the low nibble of q + 128 (see :func:`int8_blocks`)."""

        def __init__(self, parts: dict[str, Any], dense: Any, bias: Any = None) -> None:
            super().__init__(dense, bias)
            for half in ("high", "low"):
                packed, scales_zeros = pack_int4(
                    {k[len(half) + 1:]: v for k, v in parts.items() if k.startswith(half + "_")})
                self.register_buffer(f"{half}_packed", packed)
                self.register_buffer(f"{half}_scales_zeros", scales_zeros)

        def product(self, rows: Any) -> Any:
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            return (mm(rows, self.high_packed, GROUP, self.high_scales_zeros)
                    + mm(rows, self.low_packed, GROUP, self.low_scales_zeros))

    class Int8Linear(QuantizedLinear):
        """W in int8, one scale per output row."""

        def __init__(self, rows: dict[str, Any], dense: Any, bias: Any = None) -> None:
            super().__init__(dense, bias)
            self.register_buffer("weight_int8", rows["int8"])
            self.register_buffer("scale", rows["scale"].to(torch.bfloat16))

        def product(self, rows: Any) -> Any:
            return torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)

    return Int4Linear, Int8Linear, Int8BlocksLinear


def dense_weight(module: Any) -> Any | None:
    """A layer's weight as a Linear holds it, (out, in): a Linear's own, or the transpose (a
    view) of transformers' Conv1D (GPT-2's layers, which keep theirs as (in, out) and compute
    ``addmm(bias, x, weight)``: the same product); None for any other module."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.t()
    return None


def linear_names(model: Any, head: bool = True) -> list[str]:
    """The Linear (and Conv1D) layers that can be quantized: every one whose input width is a
    whole number of blocks. The LM head is last, when it is a Linear and ``head`` is true."""
    out = model.get_output_embeddings()
    names, last = [], []
    for name, module in model.named_modules():
        weight = dense_weight(module)
        if weight is not None and weight.shape[1] % GROUP == 0:
            (last if module is out else names).append(name)
    return names + (last if head else [])


def quantize_state(model: Any, kind: str) -> tuple[dict[str, Any], bool]:
    """Quantized tensors for the layers of ``linear_names``, from the model's current weights
    (float32 for exactness), and whether the int4 layers were exact.

    int4 keeps an LM head that sits exactly on 8-bit blocks (the built-in model's is GGUF Q8_0)
    as those blocks (:func:`int8_blocks`), and leaves any other head in bfloat16: int8 rows of
    the Q8_0 head flipped the greedy answer of a chat prompt whose two best first tokens are
    0.08 nats apart in float32. int8 takes every head.
    """
    state: dict[str, Any] = {}
    exact = True
    out = model.get_output_embeddings()
    head = next((name for name, module in model.named_modules() if module is out), None)
    if kind == "int4" and head in linear_names(model):
        parts = int8_blocks(out.weight)
        if parts.pop("exact"):
            state.update({f"{head}.{key}": value for key, value in parts.items()})
    for name in linear_names(model, head=kind == "int8"):
        weight = dense_weight(model.get_submodule(name))
        if kind == "int8":
            parts = int8_rows(weight)
        else:
            parts = int4_blocks(weight)
            exact = parts.pop("exact") and exact
        state.update({f"{name}.{key}": value for key, value in parts.items()})
    return state, exact


def module_for(parts: dict[str, Any], dense: Any, bias: Any = None) -> Any:
    """The quantized module for one layer's tensors (their names say which kind)."""
    int4, int8, blocks8 = _classes()
    kind = int8 if "int8" in parts else blocks8 if {"high_codes", "high_packed"} & set(parts) \
        else int4
    return kind(parts, dense, bias)


def apply(model: Any, state: dict[str, Any]) -> int:
    """Replace each Linear named in ``state`` by its quantized module; return how many."""
    names = sorted({key.rsplit(".", 1)[0] for key in state})
    for name in names:
        old = model.get_submodule(name)
        parts = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        new = module_for(parts, dense_weight(old), old.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(names)


# ----------------------------------------------------------------------------- cache


def load_cached(path: Path) -> tuple[dict[str, Any], bool] | None:
    """A quantized state saved by :func:`save_cached`, or None when absent or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("torch") != _torch_version():
                return None  # the packed layout is torch's own: another version repacks
            keys = list(f.keys())
        # clone(): torch's allocator aligns to 64 bytes; a tensor read from the file may not
        # be aligned, and the int8 kernel crashes on one that is not. The file is memory-mapped
        # and every page a clone reads stays resident until it is closed, so it is read in
        # pieces of about CLONE_PIECE bytes: the peak is the weights plus one piece, not twice
        # the weights.
        state: dict[str, Any] = {}
        while len(state) < len(keys):
            with safe_open(str(path), framework="pt") as f:
                size = 0
                for key in keys[len(state):]:
                    tensor = f.get_tensor(key).clone()
                    state[key] = tensor
                    size += tensor.numel() * tensor.element_size()
                    if size >= CLONE_PIECE:
                        break
        return state, meta.get("exact") == "1"
    except Exception:  # missing, truncated, another format: recompute
        return None


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def save_cached(path: Path, state: dict[str, Any], exact: bool) -> None:
    """Write a quantized state (see :func:`save_atomically`)."""
    save_atomically(path, state, {"format": FORMAT, "exact": "1" if exact else "0",
                                  "torch": _torch_version()}, "the quantized weights")


def save_atomically(path: Path, tensors: dict[str, Any], metadata: dict[str, str],
                    what: str) -> None:
    """Write a safetensors cache file atomically (temporary sibling, then rename); a failure
    only costs the next run.

    The temporary file carries this process's id: one that a killed process left behind (its
    process gone) is removed here, so a kill mid-write leaks nothing for good. A full disk
    (safetensors raises its own error) is a notice, not a failure: the weights are in memory.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from nlgen.models.devices import process_alive

    prefix = path.name + ".tmp-"
    for stale in path.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, SafetensorError) as exc:
        why = write_failure(exc, path.parent) or str(exc)
        log.warning("could not cache %s in %s (%s); the next run makes them again", what,
                    path.parent, why)
