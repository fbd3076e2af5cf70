"""A lean forward pass for Llama-architecture models, one sequence on the CPU.

The built-in SmolLM2-135M is a Llama: 30 layers, each a handful of small matrix products. At one
token per step the products are cheap (microseconds with int4 weights) and what ``model(...)``
spends around them (module calls, cache and mask bookkeeping, output dataclasses) is a large
share of a step. This forward runs the same arithmetic as transformers' ``LlamaForCausalLM`` with
SDPA attention (RMSNorm in float32, RoPE tables cast to the model's dtype, grouped-query SDPA,
SiLU MLP, the LM head on the last position only) on the model's own modules and weights, with:

- a key/value cache preallocated for the whole request (no growing concatenations);
- the RoPE tables computed once per request;
- with int4 weights (nlgen.models.quantized), q/k/v as one product and gate/up as one: the kernel's
  packed rows concatenate exactly, so the outputs are the same numbers in fewer calls.

Greedy decoding gives the same tokens as transformers' forward (tests/test_lean_llama.py, on a
random tiny Llama and on the built-in model). Anything else (another architecture, RoPE scaling,
biases, a GPU) keeps transformers' forward: :func:`supports` decides.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

from typing import Any

from nlgen.models import quantized
from nlgen.models.lean_weights import Weights, supports_config


def supports(model: Any) -> bool:
    """Whether :class:`LeanLlama` computes exactly what this model's own forward computes."""
    return (type(model).__name__ == "LlamaForCausalLM" and model.device.type == "cpu"
            and not model.training
            and getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
            and supports_config(model.config.to_dict()))


class LeanLlama:
    """``step(ids, position) -> logits``: the next-token logits (1, V) in float32 after the
    prompt or token(s) ``ids`` (1, T) placed at ``position``; the cache holds ``max_len``."""

    def __init__(self, weights: Weights, max_len: int) -> None:
        import torch

        config = weights.config
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = weights.head_dim
        self.embed, self.norm, self.head = weights.embed, weights.norm, weights.head
        self.dtype = self.embed.dtype
        self.layers = weights.layers
        # RoPE, as LlamaRotaryEmbedding: angles in float32, cos/sin cast to the model's dtype.
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * weights.inv_freq.float()[None, :]  # (L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, D)
        self.cos = (angles.cos() * weights.attention_scaling).to(self.dtype)
        self.sin = (angles.sin() * weights.attention_scaling).to(self.dtype)
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype)  # (layers, 1, KV, L, D)
        self.values = torch.zeros(shape, dtype=self.dtype)
        self.max_len = max_len

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
        end = position + length
        if end > self.max_len:
            raise ValueError(f"position {end} is past the cache ({self.max_len})")
        x = F.embedding(ids, self.embed)  # (1, T, H)
        cos = self.cos[position:end][None, None]  # (1, 1, T, D)
        sin = self.sin[position:end][None, None]
        half = self.head_dim // 2
        fused = length < quantized.DENSE_FROM  # the int4 kernel's range (models.quantized)
        gqa = self.heads != self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(self._rms(x, layer.input_norm), fused)  # (1, T, ·) each
            q = q.view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, heads, T, D)
            k = k.view(1, length, -1, self.head_dim).transpose(1, 2)  # (1, KV, T, D)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            self.keys[i, :, :, position:end] = k
            self.values[i, :, :, position:end] = v.view(1, length, -1, self.head_dim
                                                         ).transpose(1, 2)
            # The cache up to `end`: a prompt attends causally, one new token to everything.
            attended = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, :end], self.values[i, :, :, :end],
                scale=self.head_dim ** -0.5, is_causal=length > 1, enable_gqa=gqa)
            x = x + layer.o_proj(attended.transpose(1, 2).reshape(1, length, -1))
            gate, up = layer.gate_up(self._rms(x, layer.post_norm), fused)
            x = x + layer.down_proj(F.silu(gate) * up)
        x = self._rms(x[:, -1:], self.norm)  # (1, 1, H): only the last position is needed
        return self.head(x)[:, -1].float()  # (1, V), as generate() upcasts


