"""bfloat16 products with their weights in oneDNN's own layout, for nlgen's loop on the CPU.

A token's step multiplies one row by every weight of the model: the products read the weights
and do little else. torch's bfloat16 ``addmm``/``linear`` on a weight in its usual layout read
them at 10-16 GB/s on the 2-core test machine, which sums a bfloat16 tensor at 29-31 GB/s
(benchmarks/bench_products.py). The same weights laid out once by
``torch.ops.mkldnn._reorder_linear_weight`` (oneDNN's blocked format) are read by
``torch.ops.mkldnn._linear_pointwise`` in about 60% of the time: GPT-2-small's 48 block
products 7.9-9.1 ms instead of 13.0-16.3 ms a token, its LM head 2.2-3.5 instead of 4.6-5.4
ms, and faster at 20 rows as well (three runs of that script). It is the same oneDNN
arithmetic (float32 sums in the same order, rounded once to bfloat16): the outputs are
``addmm``'s bit for bit. nlgen.models.capabilities checks that once per process, and once per
shape of product before a layer of that shape is packed (rows built so that any other order
of additions shows); a shape where it does not hold (torch leaves the smallest products to
another kernel) keeps its plain layer. tests/test_engine_equivalence.py holds the engine to
transformers with packed layers.

Two ways in (nlgen.engine.lean_weights decides which layers):

- :func:`swap`: in a loaded model, layers are replaced by :class:`PackedLinear` modules; the plain
  weights are let go (no second copy), and ``generate()`` calls the same modules, so both loops
  gain and still compute the same bits. The model is for inference from then on (a model to
  train or to save is loaded afresh, as every command does).
- :func:`joined`: layers that read the same input (q/k/v, gate/up) as one packed product (the
  outputs side by side), for weights nlgen read from the files itself and owns. Those are
  memory-mapped from the file: once packed, their pages are handed back (:func:`release`,
  within the file mappings read once for the whole model: a read of ``/proc/self/maps`` took
  0.86 ms, and a 30-layer model packs 121 products), or the process would hold each weight
  twice (a bfloat16 run of the built-in model peaked at 918 MB without it, 710 MB with it;
  598 MB unpacked).

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from typing import Any

from nlgen.models import capabilities

log = logging.getLogger("nlgen")

PACKED = "PackedLinear"  # the class name the lean forwards recognise

_class: type | None = None


def packed_linear_class() -> type:
    """:class:`PackedLinear`, made on first use so that importing this module imports no torch."""
    global _class
    if _class is None:
        import torch

        class PackedLinear(torch.nn.Module):
            """y = x W^T + b in bfloat16, W (out, in) held in oneDNN's blocked layout."""

            def __init__(self, weight: Any, bias: Any) -> None:
                super().__init__()
                self.out_features, self.in_features = weight.shape
                # oneDNN reorders from a transposed view as well (Conv1D's (in, out) weight):
                # no contiguous copy first (2.8 instead of 4.7 ms for 768 x 3072).
                weight = weight.detach()
                if not (weight.is_contiguous() or weight.T.is_contiguous()):
                    weight = weight.contiguous()
                # An opaque tensor: a plain attribute, out of state_dict() and to().
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                self.bias = bias

            def forward(self, x: Any) -> Any:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none",
                                                          [], "")

            def extra_repr(self) -> str:
                return (f"in_features={self.in_features}, out_features={self.out_features}, "
                        f"bias={self.bias is not None}, oneDNN-packed bfloat16")

        PackedLinear.__name__ = PackedLinear.__qualname__ = PACKED
        _class = PackedLinear
    return _class


def usable(dtype: Any, device: str = "cpu") -> bool:
    """Whether bfloat16 products on ``device`` get packed on this machine (-v says why not,
    when it is the machine)."""
    import torch

    if dtype != torch.bfloat16 or device != "cpu":
        return False
    why = capabilities.packed_bf16()
    if why is not None:
        log.info("engine: bfloat16 products in the plain layout (%s)", why)
    return why is None


def _is_plain(layer: Any, kind: str) -> bool:
    import torch

    return (type(layer).__name__ == kind and getattr(layer, "weight", None) is not None
            and layer.weight.dtype == torch.bfloat16)


def _matches(layers: list[Any], kind: str) -> bool:
    """Whether the packed product of ``layers`` (side by side) adds as their plain products do
    on this machine (checked once per shape: nlgen.models.capabilities.packed_bf16_matches)."""
    if kind == "Conv1D":
        widths, width = tuple(layer.weight.shape[1] for layer in layers), layers[0].weight.shape[0]
    else:
        widths, width = tuple(layer.weight.shape[0] for layer in layers), layers[0].weight.shape[1]
    return capabilities.packed_bf16_matches(widths, width, layers[0].bias is not None, kind)


def swap(parent: Any, names: tuple[str, ...], kind: str) -> int:
    """Replace each submodule ``names`` of ``parent`` that is a plain bfloat16 ``kind``
    ("Linear": weight (out, in); "Conv1D": transformers', weight (in, out)) by a
    :class:`PackedLinear` of the same product: how many were replaced."""
    import torch

    made, swapped = packed_linear_class(), 0
    with torch.no_grad():
        for name in names:
            layer = parent.get_submodule(name)
            if _is_plain(layer, kind) and _matches([layer], kind):
                weight = layer.weight.T if kind == "Conv1D" else layer.weight
                parent.set_submodule(name, made(weight, layer.bias))
                swapped += 1
    return swapped


def file_mappings() -> list[tuple[int, int]]:
    """This process's mappings of files, (start, end) addresses (``/proc/self/maps``: its
    lines with an inode); none where that cannot be read (another system)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return [(int(low, 16), int(high, 16)) for low, high, inode in
                    ((*line.split()[0].split("-"), line.split()[4]) for line in f)
                    if inode != "0"]
    except (OSError, ValueError, IndexError):
        return []


def release(tensors: list[Any], mappings: list[tuple[int, int]] | None = None) -> None:
    """Hand back the pages of memory-mapped tensors that nothing reads any more: on Linux,
    ``madvise(MADV_DONTNEED)`` over the whole pages inside each drops them from this process
    (they stay in the page cache; a later read maps them again, unchanged).

    Only where the pages lie inside one of ``mappings`` (:func:`file_mappings`; read here
    when not given, once by a caller with many tensors to hand back), mappings of a file as
    safetensors makes them (private, copy-on-write: a page nobody wrote is read from the file
    again; nlgen never writes its weights). Anywhere else (torch's own memory, freed with the
    tensor; anonymous memory from elsewhere, whose pages DONTNEED would zero) nothing is done,
    as on other systems."""
    if sys.platform != "linux":
        return
    mappings = file_mappings() if mappings is None else mappings
    libc = None
    for tensor in tensors:
        start = tensor.data_ptr()
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours stay
        last = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and not tensor.untyped_storage().resizable() and \
                any(low <= first and last <= high for low, high in mappings):
            libc = libc or ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # DONTNEED


def joined(layers: list[Any], mappings: list[tuple[int, int]]) -> Any:
    """One :class:`PackedLinear` for plain bfloat16 ``torch.nn.Linear`` layers that read the
    same input (their outputs side by side), their weights' pages then handed back
    (:func:`release`, within ``mappings``); or None where they are not all such layers or only
    some have a bias."""
    import torch

    if not layers or not all(_is_plain(layer, "Linear") for layer in layers) or \
            len({layer.bias is None for layer in layers}) != 1 or \
            len({layer.weight.shape[1] for layer in layers}) != 1 or \
            not _matches(layers, "Linear"):
        return None
    weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 else \
        layers[0].weight
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    with torch.no_grad():
        product = packed_linear_class()(weight, bias)
    release([layer.weight for layer in layers], mappings)
    return product
