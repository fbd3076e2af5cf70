"""A lean forward pass for the Llama family (Llama, Qwen2), one sequence on the CPU.

The built-in SmolLM2-135M is a Llama: 30 layers, each a handful of small matrix products. At one
token per step the products are cheap (microseconds with int4 weights) and what ``model(...)``
spends around them (module calls, cache and mask bookkeeping, output dataclasses) is a large
share of a step. This forward runs the same arithmetic as transformers' ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` with SDPA attention (RMSNorm in float32, RoPE tables from the model's own
frequencies cast to the model's dtype, grouped-query SDPA, SiLU MLP, the LM head on the last
position only) on the model's own modules and weights (their biases, quantized layers or
adapters included: the projections are the model's modules), with:

- a key/value cache preallocated for the whole request (no growing concatenations);
- the RoPE tables computed once per request (any RoPE whose frequencies do not change with the
  length: default, linear, llama3, yarn, as transformers computes them);
- with int4 weights (nlgen.models.quantized), q/k/v as one product and gate/up as one: the kernel's
  packed rows concatenate exactly, so the outputs are the same numbers in fewer calls;
- RoPE applied to q and k as one tensor (the same operations per element);
- in bfloat16, attention computed in float32 over the bfloat16 queries, keys and values
  (:func:`sdpa`): faster on the CPU than torch's bfloat16 kernel, and closer to exact.

tests/test_engine_equivalence.py holds it to transformers (greedy tokens, logits at every step,
a prompt in pieces; in bfloat16 to transformers with its attention computed in float32 too, and
within a stated bound of stock transformers). :func:`reason` names what it does not compute
(another architecture, a sliding window, dynamic RoPE, a GPU, eager attention); those keep
transformers' ``generate()``.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from nlgen.engine.lean_weights import LLAMA_FAMILY, Weights, config_reason
from nlgen.models import quantized

ARCHITECTURES = tuple(LLAMA_FAMILY.values())


def model_reason(model: Any, architectures: tuple[str, ...]) -> str | None:
    """What rules out a lean forward for a loaded model, before its config: its class, device,
    mode, attention implementation or dtype (shared by both lean forwards)."""
    name = type(model).__name__
    if name not in architectures:
        return f"architecture {name}"
    if model.device.type != "cpu":
        return f"device {model.device}"
    if model.training:
        return "the model is in training mode"
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation != "sdpa":
        return f"attention implementation {implementation}"
    dtype = str(model.dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16"):
        return f"dtype {dtype}"
    return None


def reason(model: Any) -> str | None:
    """Why :class:`LeanLlama` does not compute what this model's own forward computes (the
    architecture, or the config key); None when it does."""
    return model_reason(model, ARCHITECTURES) or config_reason(model.config.to_dict())


def supports(model: Any) -> bool:
    return reason(model) is None


class KVCache:
    """Every layer's keys and values for ``slots`` sequences, each in its own slot (row),
    preallocated for ``max_len`` positions, and attention over them as transformers' SDPA
    path computes it: one sequence at a time (:meth:`attend`: a prompt, or one token) or one
    new token for each of the first S slots at its own position (:meth:`attend_rows`).

    One sequence's cache (``slots`` 1: a prompt decoded alone, the latency that matters at a
    terminal) keeps a bfloat16 model's keys and values in float32, the dtype :func:`sdpa`
    attends in: the same values (bfloat16 converts to float32 exactly), converted once when
    stored instead of all of them again at every step. A cache of several slots (batches,
    ``nlgen serve``: 8 slots x 2048 positions of the built-in model are 377 MB in bfloat16)
    stays in the model's dtype, at half the memory; the numbers are the same either way."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: Any, slots: int = 1) -> None:
        import torch

        shape = (layers, slots, kv_heads, max_len, head_dim)
        dtype = torch.float32 if dtype == torch.bfloat16 and slots == 1 else dtype
        self.keys = torch.zeros(shape, dtype=dtype)  # (layers, slots, KV, L, D)
        self.values = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.slots = slots
        self._views: dict[int, list[tuple[Any, Any]]] = {}  # slot -> each layer's (1, KV, L, D)

    def mask(self, position: int, length: int) -> Any:
        """The attention mask for ``length`` tokens placed at ``position``: None where SDPA's
        own flags say it (one token sees everything; a prompt at 0 is causal), else the
        (T, end) boolean mask of a later piece of a prompt (SDPA's is_causal would align it
        to the first key, not to the piece's own positions)."""
        import torch

        end = position + length
        if end > self.max_len:
            raise ValueError(f"position {end} is past the cache ({self.max_len})")
        if length == 1 or position == 0:
            return None
        rows = torch.arange(position, end)[:, None]  # (T, 1): each token's position
        return torch.arange(end)[None, :] <= rows  # (T, end)

    def attend(self, i: int, q: Any, k: Any, v: Any, position: int, mask: Any,
               scale: float, slot: int = 0) -> Any:
        """Store layer ``i``'s k, v (1, KV, T, D) at ``position`` of ``slot``; attend q
        (1, heads, T, D) to the slot's cache up to the last of them. Returns (1, T, heads*D)."""
        length = q.shape[2]
        end = position + length
        views = self._views.get(slot)
        if views is None:  # made once per slot: views of the cache, not copies
            views = self._views[slot] = [(self.keys[j, slot:slot + 1],
                                          self.values[j, slot:slot + 1])
                                         for j in range(self.keys.shape[0])]
        keys, values = views[i]  # (1, KV, L, D) each
        keys[:, :, position:end] = k
        values[:, :, position:end] = v
        attended = sdpa(q, keys[:, :, :end], values[:, :, :end], mask=mask, scale=scale,
                        causal=mask is None and length > 1)  # (1, heads, T, D)
        return attended.transpose(1, 2).reshape(1, length, -1)

    def rows_mask(self, positions: Any) -> tuple[Any, int]:
        """For one new token per slot at ``positions`` (S,): the (S, 1, 1, end) boolean mask
        that lets each see its own slot's keys up to its position, and ``end``."""
        import torch

        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end} is past the cache ({self.max_len})")
        mask = torch.arange(end)[None, :] <= positions[:, None]  # (S, end)
        return mask[:, None, None, :], end

    def attend_rows(self, i: int, q: Any, k: Any, v: Any, positions: Any, mask: Any, end: int,
                    scale: float) -> Any:
        """Store layer ``i``'s k, v (S, KV, 1, D) of slots 0..S-1, each at its own position
        (S,); attend each q (S, heads, 1, D) to its slot's keys. Returns (S, 1, heads * D)."""
        import torch

        rows = q.shape[0]
        keys, values = self.keys[i, :rows], self.values[i, :rows]  # (S, KV, L, D)
        slots = torch.arange(rows)
        keys[slots, :, positions] = k[:, :, 0].to(keys.dtype)  # (S, KV, D) at (slot, :, pos)
        values[slots, :, positions] = v[:, :, 0].to(values.dtype)
        attended = sdpa(q, keys[:, :, :end], values[:, :, :end], mask=mask, scale=scale,
                        causal=False)  # (S, heads, 1, D)
        return attended.transpose(1, 2).reshape(rows, 1, -1)


def sdpa(q: Any, k: Any, v: Any, *, mask: Any, scale: float, causal: bool) -> Any:
    """torch's scaled_dot_product_attention, with grouped-query heads (fewer k/v heads than
    q heads) by its enable_gqa flag where this torch has it (nlgen.models.capabilities), else
    by repeating k/v as transformers' repeat_kv does (the same numbers, more memory).

    bfloat16 q/k/v are attended in float32 (the same values: bfloat16 converts to float32
    exactly; :class:`KVCache` keeps one sequence's k/v so) and the output rounded back to q's
    bfloat16: torch's bfloat16 CPU kernel rounds the attention weights to bfloat16 before they
    meet v, and is the slower one (one token over 140 cached: 80 vs 46 us; over 600: 328 vs 89
    us, measured with torch 2.13 on 2 cores)."""
    import torch
    import torch.nn.functional as F

    from nlgen.models import capabilities

    dtype = q.dtype
    if dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()  # one slot's k, v: float32 already
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             is_causal=causal)
    elif capabilities.sdpa_gqa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             is_causal=causal, enable_gqa=True)
    else:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             is_causal=causal)
    return out.to(dtype)


class LeanLlama:
    """``step(ids, position, slot) -> logits``: the next-token logits (1, V) in float32 after
    the prompt or token(s) ``ids`` (1, T) of the sequence in ``slot``, placed at ``position``;
    ``step_rows(ids, positions) -> logits``: (S, V) after one new token (S, 1) for each of the
    first S slots, each at its own position (S,). The cache holds ``slots`` x ``max_len``."""

    def __init__(self, weights: Weights, max_len: int, slots: int = 1) -> None:
        import torch

        config = weights.config
        self.eps = config.rms_norm_eps
        self.head_dim = weights.head_dim
        self.heads = config.num_attention_heads
        self.embed, self.norm, self.head = weights.embed, weights.norm, weights.head
        self.dtype = self.embed.dtype
        self.layers = weights.layers
        # RoPE, as LlamaRotaryEmbedding: angles in float32, cos/sin scaled by the RoPE type's
        # attention factor and cast to the model's dtype.
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * weights.inv_freq.float()[None, :]  # (L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        self.cos = (angles.cos() * weights.attention_scaling).to(self.dtype)
        sin = (angles.sin() * weights.attention_scaling).to(self.dtype)
        # rotate_half(x) * sin = roll(x, D/2) * (sin with its first half negated): the same
        # products (a sign flip is exact), in one call instead of two slices, a negation and
        # a concatenation (8 instead of 14 us a layer).
        half = self.head_dim // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.cache = KVCache(len(self.layers), config.num_key_value_heads, max_len,
                             self.head_dim, self.dtype, slots)

    def _rms(self, x: Any, weight: Any) -> Any:
        """LlamaRMSNorm: normalized in float32, scaled by the weight in the model's dtype.
        torch's rms_norm on the CPU runs LlamaRMSNorm's own operations (upcast, mean of the
        squares, + eps, rsqrt, product, cast back) in one call instead of seven; the weight is
        applied after the cast, as LlamaRMSNorm applies it (the tests hold both to
        transformers, bit for bit)."""
        import torch.nn.functional as F

        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * weight

    def step(self, ids: Any, position: int, slot: int = 0) -> Any:
        length = ids.shape[1]
        mask = self.cache.mask(position, length)
        end = position + length
        cos = self.cos[position:end][None, None]  # (1, 1, T, D)
        sin = self.sin_signed[position:end][None, None]
        scale = self.head_dim ** -0.5

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            return self.cache.attend(i, q, k, v, position, mask, scale, slot)

        return self._forward(ids, cos, sin, attend)

    def step_rows(self, ids: Any, positions: Any) -> Any:
        mask, end = self.cache.rows_mask(positions)
        cos = self.cos[positions][:, None, None]  # (S, 1, 1, D)
        sin = self.sin_signed[positions][:, None, None]
        scale = self.head_dim ** -0.5

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            return self.cache.attend_rows(i, q, k, v, positions, mask, end, scale)

        return self._forward(ids, cos, sin, attend)

    def _forward(self, ids: Any, cos: Any, sin: Any, attend: Any) -> Any:
        """The layers over ``ids`` (B, T) with RoPE tables broadcastable to (B, 1, T, D) (``sin``
        with its first half negated: :attr:`sin_signed`) and
        ``attend(i, q, k, v)`` storing k/v and attending; (B, V) logits of the last position."""
        import torch
        import torch.nn.functional as F

        batch, length = ids.shape
        x = F.embedding(ids, self.embed)  # (B, T, H)
        half = self.head_dim // 2
        fused = batch * length < quantized.DENSE_FROM  # the int4 kernel's range
        for i, layer in enumerate(self.layers):
            qk, v = layer.qk_v(self._rms(x, layer.input_norm), fused)  # (B, T, ·) each
            # RoPE on q and k as one tensor (B, heads + KV, T, D): transformers' operations,
            # element for element, in half the calls.
            qk = qk.view(batch, length, -1, self.head_dim).transpose(1, 2)
            qk = qk * cos + torch.roll(qk, half, -1) * sin  # sin: self.sin_signed's
            q, k = qk[:, :self.heads], qk[:, self.heads:]  # (B, heads, T, D), (B, KV, T, D)
            v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
            x = x + layer.o(attend(i, q, k, v), fused)
            gate, up = layer.gate_up(self._rms(x, layer.post_norm), fused)
            x = x + layer.down(F.silu(gate) * up, fused)
        x = self._rms(x[:, -1:], self.norm)  # (B, 1, H): only the last position is needed
        return self.head(x)[:, -1].float()  # (B, V), as generate() upcasts
