"""A lean forward pass for GPT-2, one sequence on the CPU.

The same arithmetic as transformers' ``GPT2LMHeadModel`` with SDPA attention, op for op: token
and learned position embeddings added, LayerNorm, each Conv1D as the ``addmm`` of its bias, its
input and its (in, out) weight, the attention scale each ``GPT2Attention`` computed (so
``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx`` come out as the model's), the
model's own activation module (``activation_function``), the LM head (tied to the token
embeddings, or quantized) on the last position only. A layer that nlgen.models.quantized
replaced (``--quantize int8``: int8 rows, half the bytes a token of bfloat16) is called as the
module that ``generate()`` calls too, and so is a packed bfloat16 layer (nlgen.engine.packed:
the products in oneDNN's own weight layout, addmm's bits in ~55% of the time). Around it: a
key/value cache preallocated for the whole request, as nlgen.engine.lean_llama's, and none of
the module calls, cache and mask bookkeeping and output objects of ``model(...)``. In bfloat16
the attention is computed in float32 (nlgen.engine.lean_llama.sdpa: faster on the CPU, and
closer to exact).

:func:`reason` rules out what it does not compute exactly (cross-attention,
``reorder_and_upcast_attn``, layers that are not transformers' own Conv1D / LayerNorm, such as
adapters); those keep transformers' ``generate()``. tests/test_engine_equivalence.py holds it to
transformers.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from nlgen.engine.lean_llama import KVCache, model_reason
from nlgen.engine.lean_weights import GPT2, GPT2Weights, config_reason
from nlgen.engine.packed import PACKED

ARCHITECTURES = (GPT2,)
# The module classes whose tensors the forward reads directly (anything else, a LoRA layer
# wrapped around a Conv1D for one, computes something else), and nlgen's quantized layers that
# may stand in for a Conv1D (called as modules: the same call generate() makes), and the
# packed bfloat16 layer (nlgen.engine.packed: addmm's bits, from oneDNN's layout).
OWN_MODULES = {"attn.c_attn": "Conv1D", "attn.c_proj": "Conv1D", "mlp.c_fc": "Conv1D",
               "mlp.c_proj": "Conv1D", "ln_1": "LayerNorm", "ln_2": "LayerNorm"}
STAND_INS = ("Int8Linear", "Int4Linear", PACKED)


def reason(model: Any) -> str | None:
    """Why :class:`LeanGPT2` does not compute what this model's own forward computes (the
    architecture, the config key or the layer); None when it does."""
    why = model_reason(model, ARCHITECTURES) or config_reason(model.config.to_dict())
    if why is not None:
        return why
    body = model.transformer
    if type(body.wte).__name__ != "Embedding" or type(body.wpe).__name__ != "Embedding":
        return "embeddings that are not torch's Embedding"
    for i, block in enumerate(body.h):
        for name, kind in OWN_MODULES.items():
            found = type(block.get_submodule(name)).__name__
            if found != kind and not (kind == "Conv1D" and found in STAND_INS):
                return f"layer transformer.h.{i}.{name} is a {found}, not a {kind}"
    return None


def supports(model: Any) -> bool:
    return reason(model) is None


def _conv(x: Any, layer: Any) -> Any:
    """transformers' Conv1D: (..., in) -> (..., out), ``addmm(bias, x, weight)``; a quantized
    or packed layer in its place computes itself."""
    import torch

    if type(layer).__name__ != "Conv1D":
        return layer.forward(x)  # the module's own computation, without its call machinery
    out = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)  # (M, out)
    return out.view(*x.shape[:-1], -1)


class LeanGPT2:
    """``step(ids, position, slot) -> logits``: the next-token logits (1, V) in float32 after
    the prompt or token(s) ``ids`` (1, T) of the sequence in ``slot``, placed at ``position``;
    ``step_rows(ids, positions) -> logits``: (S, V) after one new token (S, 1) for each of the
    first S slots, each at its own position (S,). The cache holds ``slots`` x ``max_len``."""

    def __init__(self, weights: GPT2Weights, max_len: int, slots: int = 1) -> None:
        config = weights.config
        if max_len > weights.wpe.shape[0]:
            raise ValueError(f"{max_len} positions exceed the model's {weights.wpe.shape[0]}")
        self.w = weights
        self.width = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.cache = KVCache(len(weights.layers), config.n_head, max_len, self.head_dim,
                             weights.wte.dtype, slots)

    def _norm(self, x: Any, norm: Any) -> Any:
        import torch.nn.functional as F

        return F.layer_norm(x, (self.width,), norm.weight, norm.bias, norm.eps)

    def step(self, ids: Any, position: int, slot: int = 0) -> Any:
        import torch

        length = ids.shape[1]
        mask = self.cache.mask(position, length)
        positions = torch.arange(position, position + length)[None]  # (1, T)

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            return self.cache.attend(i, q, k, v, position, mask, self.w.scalings[i], slot)

        return self._forward(ids, positions, attend)

    def step_rows(self, ids: Any, positions: Any) -> Any:
        mask, end = self.cache.rows_mask(positions)

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            return self.cache.attend_rows(i, q, k, v, positions, mask, end, self.w.scalings[i])

        return self._forward(ids, positions[:, None], attend)

    def _forward(self, ids: Any, positions: Any, attend: Any) -> Any:
        """The blocks over ``ids`` (B, T) at ``positions`` (B or 1, T), ``attend(i, q, k, v)``
        storing k/v and attending; (B, V) logits of the last position."""
        import torch.nn.functional as F

        w = self.w
        batch, length = ids.shape
        x = F.embedding(ids, w.wte) + F.embedding(positions, w.wpe)  # (B, T, H)
        for i, block in enumerate(w.layers):
            attn, mlp = block.attn, block.mlp
            q, k, v = _conv(self._norm(x, block.ln_1), attn.c_attn).split(self.width, dim=2)
            q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2)
                       for t in (q, k, v))  # (B, heads, T, D) each
            x = _conv(attend(i, q, k, v), attn.c_proj) + x  # (B, T, H)
            x = x + _conv(mlp.act(_conv(self._norm(x, block.ln_2), mlp.c_fc)), mlp.c_proj)
        ln_f = F.layer_norm(x[:, -1:], (self.width,), *w.ln_f, w.eps)  # (B, 1, H): last only
        return w.head(ln_f)[:, -1].float()  # (B, V), as generate() upcasts
