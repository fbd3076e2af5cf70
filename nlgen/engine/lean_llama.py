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
  packed rows concatenate exactly, so the outputs are the same numbers in fewer calls.

tests/test_engine_equivalence.py holds it to transformers (greedy tokens, logits at every step,
a prompt in pieces). :func:`reason` names what it does not compute (another architecture, a
sliding window, dynamic RoPE, a GPU, eager attention); those keep transformers' ``generate()``.

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
    """Every layer's keys and values for one sequence, preallocated for the whole request, and
    attention over them as transformers' SDPA path computes it."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: Any) -> None:
        import torch

        shape = (layers, 1, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)  # (layers, 1, KV, L, D)
        self.values = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len

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
               scale: float) -> Any:
        """Store layer ``i``'s k, v (1, KV, T, D) at ``position``; attend q (1, heads, T, D)
        to the cache up to the last of them. Returns (1, T, heads * D)."""
        import torch.nn.functional as F

        length = q.shape[2]
        end = position + length
        self.keys[i, :, :, position:end] = k
        self.values[i, :, :, position:end] = v
        attended = F.scaled_dot_product_attention(
            q, self.keys[i, :, :, :end], self.values[i, :, :, :end], attn_mask=mask,
            scale=scale, is_causal=mask is None and length > 1,
            enable_gqa=q.shape[1] != k.shape[1])  # (1, heads, T, D)
        return attended.transpose(1, 2).reshape(1, length, -1)


class LeanLlama:
    """``step(ids, position) -> logits``: the next-token logits (1, V) in float32 after the
    prompt or token(s) ``ids`` (1, T) placed at ``position``; the cache holds ``max_len``."""

    def __init__(self, weights: Weights, max_len: int) -> None:
        import torch

        config = weights.config
        self.eps = config.rms_norm_eps
        self.head_dim = weights.head_dim
        self.embed, self.norm, self.head = weights.embed, weights.norm, weights.head
        self.dtype = self.embed.dtype
        self.layers = weights.layers
        # RoPE, as LlamaRotaryEmbedding: angles in float32, cos/sin scaled by the RoPE type's
        # attention factor and cast to the model's dtype.
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * weights.inv_freq.float()[None, :]  # (L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        self.cos = (angles.cos() * weights.attention_scaling).to(self.dtype)
        self.sin = (angles.sin() * weights.attention_scaling).to(self.dtype)
        self.cache = KVCache(len(self.layers), config.num_key_value_heads, max_len,
                             self.head_dim, self.dtype)

    def _rms(self, x: Any, weight: Any) -> Any:
        """LlamaRMSNorm: normalized in float32, scaled by the weight in the model's dtype."""
        import torch

        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    def step(self, ids: Any, position: int) -> Any:
        import torch
        import torch.nn.functional as F

        length = ids.shape[1]
        mask = self.cache.mask(position, length)
        end = position + length
        x = F.embedding(ids, self.embed)  # (1, T, H)
        cos = self.cos[position:end][None, None]  # (1, 1, T, D)
        sin = self.sin[position:end][None, None]
        half = self.head_dim // 2
        fused = length < quantized.DENSE_FROM  # the int4 kernel's range (models.quantized)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(self._rms(x, layer.input_norm), fused)  # (1, T, ·) each
            q = q.view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, heads, T, D)
            k = k.view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, KV, T, D)
            v = v.view(1, length, -1, self.head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            attended = self.cache.attend(i, q, k, v, position, mask, self.head_dim ** -0.5)
            x = x + layer.o_proj(attended)
            gate, up = layer.gate_up(self._rms(x, layer.post_norm), fused)
            x = x + layer.down_proj(F.silu(gate) * up)
        x = self._rms(x[:, -1:], self.norm)  # (1, 1, H): only the last position is needed
        return self.head(x)[:, -1].float()  # (1, V), as generate() upcasts
