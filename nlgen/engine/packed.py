"""bfloat16 products with their weights in oneDNN's own layout, for nlgen's loop on the CPU.

A token's step multiplies one row by every weight of the model: the products read the weights
and do little else. torch's bfloat16 ``addmm``/``linear`` on a weight in its usual layout read
them at 12-14 GB/s on the 2-core test machine, where the same machine streams 48 GB/s through a
``sum`` (benchmarks/bench_engine.py, README "The engine"). The same weights laid out once by
``torch.ops.mkldnn._reorder_linear_weight`` (oneDNN's blocked format) are read by
``torch.ops.mkldnn._linear_pointwise`` in ~55% of the time: 48 products of GPT-2-small's shapes,
8.1 instead of 14.0 ms, at 1, 20 and 200 rows alike. It is the same oneDNN arithmetic (float32
sums, rounded once to bfloat16): the outputs are ``addmm``'s bit for bit, which
nlgen.models.capabilities.packed_bf16 checks once per process before anything is packed
(tests/test_engine_equivalence.py on GPT-2-small's shapes too).

:func:`pack` swaps, in a loaded bfloat16 GPT-2 on the CPU that is not training, each Conv1D of
the blocks and the LM head for a :class:`PackedLinear` holding its packed weight; the plain
weights are let go (no second copy), and ``generate()`` calls the same modules, so both loops
gain, and they still compute the same bits. The model is for inference from then on (a model to
train or to save is loaded afresh, as every command does).

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
from typing import Any

from nlgen.models import capabilities

log = logging.getLogger("nlgen")

PACKED = "PackedLinear"  # the class name the lean forwards recognise
GPT2_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

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
                # An opaque tensor: a plain attribute, out of state_dict() and to().
                self.packed = torch.ops.mkldnn._reorder_linear_weight(
                    weight.detach().contiguous(), 1)
                self.bias = bias

            def forward(self, x: Any) -> Any:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none",
                                                          [], "")

            def extra_repr(self) -> str:
                return (f"in_features={self.in_features}, out_features={self.out_features}, "
                        f"bias={self.bias is not None}, oneDNN-packed bfloat16")

        PackedLinear.__name__ = PACKED
        _class = PackedLinear
    return _class


def pack(model: Any) -> int:
    """Swap a GPT-2's plain bfloat16 products for packed ones (see the module's notes): how many
    layers were swapped (0 where the model, its device or dtype, or this machine does not allow
    it; -v says why when it is the machine)."""
    if type(model).__name__ != "GPT2LMHeadModel" or getattr(model, "training", True):
        return 0
    import torch

    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return 0
    why = capabilities.packed_bf16()
    if why is not None:
        log.info("engine: bfloat16 products in the plain layout (%s)", why)
        return 0
    made = packed_linear_class()
    swapped = 0
    with torch.no_grad():
        for block in model.transformer.h:
            for name in GPT2_LAYERS:
                layer = block.get_submodule(name)
                if type(layer).__name__ == "Conv1D":  # weight (in, out)
                    block.set_submodule(name, made(layer.weight.T, layer.bias))
                    swapped += 1
        head = model.lm_head
        if type(head) is torch.nn.Linear:  # tied: the embeddings keep their own table
            model.lm_head = made(head.weight, head.bias)
            swapped += 1
    return swapped
