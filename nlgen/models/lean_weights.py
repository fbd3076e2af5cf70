"""A Llama's weights in the form nlgen's lean forward runs them, read from a model or files.

:class:`Weights` is what :class:`nlgen.engine.lean_llama.LeanLlama` reads: the embeddings, the
norms, each layer's projections (dense, or int4/int8 from :mod:`nlgen.models.quantized`, with
q/k/v and gate/up fused into one product where the kernel's packing allows it) and the LM head.
They come from a loaded transformers model (:func:`from_model`, shared, not copied) or straight
from a saved directory's ``model.safetensors`` and the int4 cache (:func:`from_files`), without
building transformers' model: reading the weights in the form they run is a loading concern,
so it lives with the other readers; the engine only runs them.

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nlgen.models import quantized


def supports_config(config: dict[str, Any]) -> bool:
    """Whether a config.json describes a Llama this forward computes exactly."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return (config.get("model_type") == "llama"
            and (config.get("architectures") or ["LlamaForCausalLM"]) == ["LlamaForCausalLM"]
            and config.get("hidden_act", "silu") == "silu"
            and not config.get("attention_bias") and not config.get("mlp_bias")
            and config.get("pretraining_tp", 1) == 1
            and rope.get("rope_type", rope.get("type", "default")) == "default"
            and "quantization_config" not in config)


@dataclass
class Weights:
    """What the forward reads: the config, the embeddings, the layers and the LM head."""

    config: Any  # the model's config (or config.json as a namespace): sizes, eps, RoPE
    embed: Any  # (V, H)
    norm: Any  # (H,)
    head: Any  # (..., H) -> (..., V): the LM head, a Linear (tied to `embed` or its own)
    layers: list[_Layer]
    inv_freq: Any  # (D/2,) float32, LlamaRotaryEmbedding's
    attention_scaling: float = 1.0
    generation_config: Any = None  # the model's GenerationConfig (files only)

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def from_model(model: Any) -> Weights:
    """The weights of a loaded ``LlamaForCausalLM`` (shared, not copied; fused where int4)."""
    inner = model.model
    layers = [_Layer.of(layer) for layer in inner.layers[:model.config.num_hidden_layers]]
    return Weights(model.config, inner.embed_tokens.weight, inner.norm.weight, model.lm_head,
                   layers, inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling,
                   getattr(model, "generation_config", None))


def from_files(directory: Path, dtype: str, int4: dict[str, Any] | None) -> Weights | None:
    """The weights of a saved Llama directory (config.json, model.safetensors), read without
    building transformers' model (whose import alone costs ~1.7 s on the 2-core machines);
    ``int4``: nlgen.models.quantized's cached int4 state for its Linear layers. None when the
    directory holds something else (another architecture, sharded weights, no generation
    config): the caller loads it the usual way."""
    import torch
    from safetensors import safe_open
    from transformers import GenerationConfig

    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weights_file = directory / "model.safetensors"
    if not (supports_config(raw) and weights_file.is_file()
            and (directory / "generation_config.json").is_file()):
        return None
    config = SimpleNamespace(**raw)
    with safe_open(str(weights_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k).to(getattr(torch, dtype)) for k in f.keys()}

    quantized_parts: dict[str, dict[str, Any]] = {}  # layer name -> its quantized tensors
    for key, value in (int4 or {}).items():
        layer, _, part = key.rpartition(".")
        quantized_parts.setdefault(layer, {})[part] = value

    def linear(name: str, weight_name: str | None = None) -> Any:
        """Layer ``name``: its quantized module where the int4 state has it, else dense."""
        weight = tensors[f"{weight_name or name}.weight"]
        if name in quantized_parts:
            return quantized.module_for(quantized_parts[name], weight)
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        return module

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(_Layer(
            tensors[p + "input_layernorm.weight"], tensors[p + "post_attention_layernorm.weight"],
            *(linear(p + "self_attn." + n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(linear(p + "mlp." + n) for n in ("gate_proj", "up_proj", "down_proj"))))
    tied = raw.get("tie_word_embeddings", True) or "lm_head.weight" not in tensors
    head = linear("lm_head", "model.embed_tokens" if tied else None)
    rope = raw.get("rope_parameters") or {}
    base = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # LlamaRotaryEmbedding.compute_default_rope_parameters, to the letter.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return Weights(config, tensors["model.embed_tokens.weight"], tensors["model.norm.weight"],
                   head, layers, inv_freq, 1.0, GenerationConfig.from_pretrained(directory))


class _Layer:
    """One decoder layer's weights, with q/k/v and gate/up fused where the kernel allows it."""

    def __init__(self, input_norm: Any, post_norm: Any, q_proj: Any, k_proj: Any, v_proj: Any,
                 o_proj: Any, gate_proj: Any, up_proj: Any, down_proj: Any) -> None:
        self.input_norm, self.post_norm = input_norm, post_norm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.sizes = (q_proj.out_features, k_proj.out_features)
        self.fused_qkv = fuse([q_proj, k_proj, v_proj])
        self.fused_gate_up = fuse([gate_proj, up_proj])

    @classmethod
    def of(cls, layer: Any) -> _Layer:
        """The layer of a transformers LlamaDecoderLayer (its own modules)."""
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def qkv(self, h: Any, fused: bool) -> tuple[Any, Any, Any]:
        if fused and self.fused_qkv is not None:
            out = self.fused_qkv(h)
            q, k = self.sizes
            return out[..., :q], out[..., q:q + k], out[..., q + k:]
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def gate_up(self, h: Any, fused: bool) -> tuple[Any, Any]:
        if fused and self.fused_gate_up is not None:
            out = self.fused_gate_up(h)
            return out[..., :self.gate_proj.out_features], out[..., self.gate_proj.out_features:]
        return self.gate_proj(h), self.up_proj(h)


def fuse(layers: list[Any]) -> Any:
    """One product for several quantized layers that read the same input (q/k/v, gate/up):
    a function (M, K) -> (M, sum of their widths) for fewer than DENSE_FROM rows, or None
    unless all are int4 (or all int8) without bias. The int4 kernel packs its rows in tiles
    (quantized.INT4_TILE): when every layer's width is a whole number of tiles, the packed rows
    and the scales concatenate exactly, and the outputs are the layers' own, side by side."""
    import torch

    int4, int8, _ = quantized._classes()
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1 or kinds & {int4, int8} == set() or any(
            layer.bias is not None for layer in layers):
        return None
    width = layers[0].in_features
    if int4 in kinds:
        if any(layer.out_features % quantized.INT4_TILE for layer in layers):
            return None
        packed = torch.cat([layer.packed for layer in layers])  # (N, K/2)
        scales_zeros = torch.cat([layer.scales_zeros for layer in layers], dim=1)  # (K/G, N, 2)

        def product(x: Any) -> Any:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, width).contiguous(), packed, quantized.GROUP, scales_zeros)
            return out.reshape(*x.shape[:-1], -1)
    else:
        weight = torch.cat([layer.weight_int8 for layer in layers])  # (N, K)
        scale = torch.cat([layer.scale for layer in layers])  # (N,)

        def product(x: Any) -> Any:
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, width).contiguous(), weight,
                                                     scale)
            return out.reshape(*x.shape[:-1], -1)
    return product
