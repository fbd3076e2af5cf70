"""The weights of the models nlgen's lean forwards run, in the form they run them.

Two families: the Llama family as transformers configures it (``LlamaForCausalLM``,
``Qwen2ForCausalLM``), whose :class:`Weights` nlgen.engine.lean_llama runs, and GPT-2
(``GPT2LMHeadModel``), whose :class:`GPT2Weights` nlgen.engine.lean_gpt2 runs. Both come from a
loaded transformers model (:func:`from_model`: shared, not copied; int4/int8 layers from
:mod:`nlgen.models.quantized` kept, with q/k/v and gate/up fused where the kernel's packing
allows it). A saved Llama-family directory can also be read straight from its
``model.safetensors`` and the int4 cache (:func:`from_files`), without building transformers'
model: reading the weights in the form they run is a loading concern, so it lives with the
other readers; the engine only runs them.

:func:`config_reason` says which configs these forwards compute exactly, and names the key that
rules a config out (the caller falls back to transformers' ``generate()``).

torch is imported inside the functions that use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nlgen.engine import packed
from nlgen.models import quantized

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # model_type -> class
GPT2 = "GPT2LMHeadModel"
# The products of a block, by architecture: what nlgen.engine.packed lays out in bfloat16.
GPT2_PRODUCTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_PRODUCTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# RoPE types whose frequencies are fixed once made (transformers' ROPE_INIT_FUNCTIONS compute
# them; "dynamic" and "longrope" change them with the sequence length, which we do not follow).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# transformers' own defaults (the LlamaConfig / Qwen2Config fields) for the keys the forward
# reads, for a config.json that leaves some out; tests/test_engine_equivalence.py holds them to
# the classes. Building the class itself costs ~1 s of imports for LlamaConfig (its validators
# import transformers.activations, hence torch.distributed.tensor), which the files read avoids.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "head_dim": None},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "use_sliding_window": False, "layer_types": None},
}


def rope_type(config: dict[str, Any]) -> str:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default"))


def config_reason(config: dict[str, Any]) -> str | None:
    """Why the lean forwards do not compute what transformers computes for this config (a
    model's ``config.to_dict()``, or a config.json with :data:`DEFAULTS` filled in): the
    architecture or the config key that rules it out; None when they do."""
    model_type = config.get("model_type")
    expected = GPT2 if model_type == "gpt2" else LLAMA_FAMILY.get(model_type or "")
    architectures = config.get("architectures") or ([expected] if expected else [])
    if expected is None or architectures != [expected]:
        return "architecture " + ("/".join(map(str, architectures))
                                  or f"of model type {model_type!r}")
    if "quantization_config" in config:
        return "config quantization_config"
    if model_type == "gpt2":
        for key in ("add_cross_attention", "reorder_and_upcast_attn"):
            if config.get(key):
                return f"config {key}"
        return None
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    layer_types = config.get("layer_types") or ["full_attention"]
    checks = {"hidden_act": config.get("hidden_act", "silu") == "silu",
              "rope_type": rope_type(config) in STATIC_ROPE,
              "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) == 1.0
              and config.get("partial_rotary_factor", 1.0) == 1.0,
              "use_sliding_window": not config.get("use_sliding_window"),
              "layer_types": set(layer_types) == {"full_attention"}}
    failed = next((key for key, ok in checks.items() if not ok), None)
    if failed is not None:
        value = rope_type(config) if failed == "rope_type" else config.get(failed)
        return f"config {failed} {value!r}"
    return None


@dataclass
class Weights:
    """What the Llama-family forward reads: the config, the embeddings, the layers and the head."""

    config: Any  # the model's config (or config.json with DEFAULTS, as a namespace)
    embed: Any  # (V, H)
    norm: Any  # (H,)
    head: Any  # (..., H) -> (..., V): the LM head, a Linear (tied to `embed` or its own)
    layers: list[_Layer]
    inv_freq: Any  # (D/2,) float32, the model's rotary embedding's
    attention_scaling: float = 1.0  # its cos/sin factor (yarn's; 1.0 for the others)
    generation_config: Any = None  # the model's GenerationConfig

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@dataclass
class GPT2Weights:
    """What the GPT-2 forward reads: Conv1D weights as they are stored, (in, out)."""

    config: Any
    wte: Any  # (V, H) token embeddings
    wpe: Any  # (P, H) learned positions
    ln_f: tuple[Any, Any]  # the final LayerNorm's (weight, bias), each (H,)
    head: Any  # the LM head module (tied to wte, or quantized)
    layers: list[Any]  # transformers' GPT2Block modules, whose tensors the forward reads
    scalings: list[float]  # each layer's attention scale, as GPT2Attention computed it
    eps: float = 1e-5
    generation_config: Any = None


def from_model(model: Any) -> Weights | GPT2Weights:
    """The weights of a loaded model that :func:`config_reason` accepts (shared, not copied;
    fused where int4; in bfloat16 on the CPU, the model's own products packed in place
    first: :func:`pack`)."""
    pack(model)
    generation_config = getattr(model, "generation_config", None)
    if type(model).__name__ == GPT2:
        body = model.transformer
        blocks = list(body.h)
        return GPT2Weights(model.config, body.wte.weight, body.wpe.weight,
                           (body.ln_f.weight, body.ln_f.bias), model.lm_head, blocks,
                           [float(b.attn.scaling) for b in blocks], body.ln_f.eps,
                           generation_config)
    inner = model.model
    layers = [_Layer.of(layer) for layer in inner.layers[:model.config.num_hidden_layers]]
    return Weights(model.config, inner.embed_tokens.weight, inner.norm.weight, model.lm_head,
                   layers, inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling,
                   generation_config)


def pack(model: Any) -> int:
    """Swap a loaded bfloat16 model's products (each block's, and the LM head) for packed ones
    (nlgen.engine.packed: the same bits, in ~60% of the time, the plain weights let go;
    generate() calls the same modules): how many. 0 for a model that could be trained (in
    training mode, or with a parameter that requires grad: models.loading loads a model to
    generate with none), on another device or dtype, or on a machine where packing does not
    give addmm's bits."""
    if model.training or any(p.requires_grad for p in model.parameters()) or \
            not packed.usable(model.dtype, model.device.type):
        return 0
    if type(model).__name__ == GPT2:
        swapped = sum(packed.swap(block, GPT2_PRODUCTS, "Conv1D") for block in model.transformer.h)
    else:
        swapped = sum(packed.swap(layer, LLAMA_PRODUCTS, "Linear")
                      for layer in model.model.layers)
    # A tied head gets its own packed copy: the embeddings keep the table they look up.
    return swapped + packed.swap(model, ("lm_head",), "Linear")


def with_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A Llama-family config.json with transformers' defaults for the keys it leaves out."""
    config = {**DEFAULTS.get(raw.get("model_type") or "", {}), **raw}
    if config.get("num_key_value_heads") is None:
        config["num_key_value_heads"] = config["num_attention_heads"]
    if "head_dim" in config and config["head_dim"] is None:  # LlamaConfig.__post_init__
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def from_files(directory: Path, dtype: str, int4: dict[str, Any] | None,
               cache: Path | None = None) -> Weights | None:
    """The weights of a saved Llama-family directory (config.json, model.safetensors), read
    without building transformers' model (whose import alone costs ~1.7 s on the 2-core
    machines); ``int4``: nlgen.models.quantized's cached int4 state for its Linear layers.
    None when the directory holds something else (another architecture, scaled RoPE, sharded
    weights, missing tensors, no generation config): the caller loads it the usual way.

    ``cache`` (nlgen's own directory for this model, such as a GGUF's converted copy): where
    the weights are kept in ``dtype`` as well (:func:`_in_dtype`), so that later runs read them
    memory-mapped as they run: a dense weight then costs memory only once something reads it
    (with int4 layers, the dense copies serve long prompts and batches only)."""
    import torch
    from safetensors import safe_open
    from transformers import GenerationConfig

    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weights_file = directory / "model.safetensors"
    if not (isinstance(raw, dict) and raw.get("model_type") in LLAMA_FAMILY
            and config_reason(with_defaults(raw)) is None and rope_type(raw) == "default"
            and weights_file.is_file() and (directory / "generation_config.json").is_file()):
        return None
    config = SimpleNamespace(**with_defaults(raw))
    copy = _in_dtype(weights_file, dtype, cache)
    converted = False
    with safe_open(str(copy or weights_file), framework="pt") as f:
        tensors = {}
        for key in f.keys():
            # A tensor already in ``dtype`` (to() returns it as it is) stays memory-mapped.
            tensor = f.get_tensor(key)
            tensors[key] = tensor.to(getattr(torch, dtype))
            converted = converted or tensors[key] is not tensor
    if converted and cache is not None:
        quantized.save_atomically(cache / f"model-{dtype}.safetensors", tensors,
                                  {"source": _stamp(weights_file)}, f"the {dtype} weights")
    tied = config.tie_word_embeddings
    if not _has_tensors(config, tensors, tied):
        return None  # transformers would make up the missing ones: let it, and say so
    quantized_parts: dict[str, dict[str, Any]] = {}  # layer name -> its quantized tensors
    for key, value in (int4 or {}).items():
        layer, _, part = key.rpartition(".")
        quantized_parts.setdefault(layer, {})[part] = value

    def linear(name: str, weight_name: str | None = None, bias: bool = False) -> Any:
        """Layer ``name``: its quantized module where the int4 state has it, else dense."""
        weight = tensors[f"{weight_name or name}.weight"]
        b = tensors[f"{name}.bias"] if bias else None
        if name in quantized_parts:
            return quantized.module_for(quantized_parts[name], weight, b)
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.bias = None if b is None else torch.nn.Parameter(b, requires_grad=False)
        return module

    attn_bias, mlp_bias = _biases(config)
    # Dense bfloat16 layers in oneDNN's layout (int4 ones have their own kernel), their pages
    # in the file's mapping handed back once packed.
    mappings = packed.file_mappings() \
        if not quantized_parts and packed.usable(getattr(torch, dtype)) else None
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(_Layer(
            tensors[p + "input_layernorm.weight"], tensors[p + "post_attention_layernorm.weight"],
            *(linear(p + "self_attn." + n, bias=n in attn_bias)
              for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(linear(p + "mlp." + n, bias=mlp_bias) for n in ("gate_proj", "up_proj",
                                                               "down_proj")),
            mappings=mappings))
    head = linear("lm_head", "model.embed_tokens" if tied else None)
    if mappings is not None:  # tied: its own packed copy; the table stays for the lookups
        head = packed.joined([head], mappings) or head
    rope = raw.get("rope_parameters") or {}
    base = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # LlamaRotaryEmbedding.compute_default_rope_parameters, to the letter.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return Weights(config, tensors["model.embed_tokens.weight"], tensors["model.norm.weight"],
                   head, layers, inv_freq, 1.0, GenerationConfig.from_pretrained(directory))


def _biases(config: Any) -> tuple[tuple[str, ...], bool]:
    """Which attention projections have a bias, and whether the MLP's do: Qwen2 has q/k/v
    biases (not o), Llama all four or none (attention_bias), and mlp_bias."""
    if config.model_type == "qwen2":
        return ("q_proj", "k_proj", "v_proj"), False
    attn = ("q_proj", "k_proj", "v_proj", "o_proj") if config.attention_bias else ()
    return attn, bool(config.mlp_bias)


def _has_tensors(config: Any, tensors: dict[str, Any], tied: bool) -> bool:
    attn_bias, mlp_bias = _biases(config)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [] if tied else ["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [f"{p}self_attn.{n}.weight"] + ([f"{p}self_attn.{n}.bias"]
                                                     if n in attn_bias else [])
        for n in ("gate_proj", "up_proj", "down_proj"):
            names += [f"{p}mlp.{n}.weight"] + ([f"{p}mlp.{n}.bias"] if mlp_bias else [])
    return all(name in tensors for name in names)


def _stamp(path: Path) -> str:
    """The size and modification time of a file (what a cached copy of it was made from)."""
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _in_dtype(weights_file: Path, dtype: str, cache: Path | None) -> Path | None:
    """The copy of ``weights_file`` in ``dtype`` that :func:`from_files` keeps in ``cache``,
    when it is there and was made from this very file; else None."""
    from safetensors import safe_open

    if cache is None:
        return None
    copy = cache / f"model-{dtype}.safetensors"
    try:
        with safe_open(str(copy), framework="pt") as f:
            made_from = (f.metadata() or {}).get("source")
    except Exception:  # absent, truncated: made again
        return None
    return copy if made_from == _stamp(weights_file) else None


class _Layer:
    """One decoder layer's weights, with q/k/v and gate/up fused where the kernel allows it."""

    def __init__(self, input_norm: Any, post_norm: Any, q_proj: Any, k_proj: Any, v_proj: Any,
                 o_proj: Any, gate_proj: Any, up_proj: Any, down_proj: Any,
                 mappings: list[tuple[int, int]] | None = None) -> None:
        """``mappings`` (not None): the layers are nlgen's own (read from the files, whose
        mappings these are) and dense bfloat16 ones are to be packed (nlgen.engine.packed),
        q/k/v and gate/up each as one product; the plain weights are then let go, and the
        packed products serve every number of rows."""
        self.input_norm, self.post_norm = input_norm, post_norm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.sizes = (q_proj.out_features, k_proj.out_features)
        self.gate_width = gate_proj.out_features
        joined = [packed.joined(group, mappings) if mappings is not None else None
                  for group in ([q_proj, k_proj, v_proj], [gate_proj, up_proj], [o_proj],
                                [down_proj])]
        self.packed = all(product is not None for product in joined)
        if self.packed:  # called as the int4 products are, without the module machinery
            self.fused_qkv, self.fused_gate_up, self.direct_o, self.direct_down = (
                product.forward for product in joined)
            self.q_proj = self.k_proj = self.v_proj = self.o_proj = None
            self.gate_proj = self.up_proj = self.down_proj = None
            return
        self.fused_qkv = fuse([q_proj, k_proj, v_proj])
        self.fused_gate_up = fuse([gate_proj, up_proj])
        # o and down alone: the same kernel call without the module's call machinery.
        self.direct_o, self.direct_down = fuse([o_proj]), fuse([down_proj])

    @classmethod
    def of(cls, layer: Any) -> _Layer:
        """The layer of a transformers Llama/Qwen2 decoder layer (its own modules)."""
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def qk_v(self, h: Any, fused: bool) -> tuple[Any, Any]:
        """(q and k side by side (B, T, q + k widths), v): RoPE then turns q and k together."""
        import torch

        q, k = self.sizes
        if (fused or self.packed) and self.fused_qkv is not None:
            out = self.fused_qkv(h)
            return out[..., :q + k], out[..., q + k:]
        return torch.cat((self.q_proj(h), self.k_proj(h)), dim=-1), self.v_proj(h)

    def o(self, h: Any, fused: bool) -> Any:
        return (self.direct_o(h) if (fused or self.packed) and self.direct_o is not None
                else self.o_proj(h))

    def down(self, h: Any, fused: bool) -> Any:
        return (self.direct_down(h) if (fused or self.packed) and self.direct_down is not None
                else self.down_proj(h))

    def gate_up(self, h: Any, fused: bool) -> tuple[Any, Any]:
        if (fused or self.packed) and self.fused_gate_up is not None:
            out = self.fused_gate_up(h)
            return out[..., :self.gate_width], out[..., self.gate_width:]
        return self.gate_proj(h), self.up_proj(h)


def fuse(layers: list[Any]) -> Any:
    """One product for several quantized layers that read the same input (q/k/v, gate/up; or
    one layer's product, without its module call):
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


def read(directory: Path, dtype: str, quantize: str, cache: Path | None) -> tuple[Any, str]:
    """The lean forward's weights for a saved Llama, int4 from the cache where ``quantize``
    asks for it and the cache is there; (None, "none") when the usual load must do it (another
    architecture, int8, or the int4 cache not made yet: the usual load makes it).

    The ``lean_reader`` that generation hands to models.loading.load_model: reading weights in
    the form the engine runs them is the engine's job; loading offers the hook."""
    int4, kind = None, "none"
    if quantize == "int8":
        return None, "none"
    if quantize in ("auto", "int4"):
        found = quantized.load_cached(cache / quantized.CACHE_FILE) if cache else None
        if found is None:
            return None, "none"
        if found[1] or quantize == "int4":  # exact 4-bit blocks, or asked for
            int4, kind = found[0], "int4"
    weights = from_files(directory, dtype, int4, cache)
    return (weights, kind) if weights is not None else (None, "none")
