"""How a saved model's files become objects: transformers' ``from_pretrained`` (with nlgen's
quantization). The engine reads the weights its lean forwards run itself
(nlgen.engine.lean_weights.read, handed to models.loading.load_model as ``lean_reader``).

nlgen.models.loading decides which; this module does it. torch and transformers are imported inside
the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nlgen.errors import ModelError, first_line
from nlgen.models import quantized

# A directory holds a tokenizer when it has one of these (a glob each): the tokenizers file,
# GPT-2's vocabulary and merges, a sentencepiece or tiktoken model, a WordPiece vocabulary.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("*.model",),
                   ("*.tiktoken",), ("vocab.txt",))


def check_tokenizer_files(directory: Path, display: str) -> None:
    """A model directory without a tokenizer is named as such, with the files it lacks.

    transformers says "Couldn't instantiate the backend tokenizer from one of: " and nothing
    after it, or builds an empty tokenizer that turns every prompt into no tokens at all.
    An adapter directory (LoRA, not merged) or a model that brings its own code may keep its
    tokenizer elsewhere: those are left to transformers.
    """
    if not (directory / "config.json").is_file():
        return
    if any(all(any(directory.glob(pattern)) for pattern in group) for group in TOKENIZER_FILES):
        return
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and "auto_map" in config:
            return
    except (OSError, ValueError):
        pass
    raise ModelError(f"{display.rstrip('/')}/ has no tokenizer (tokenizer.json, or vocab.json "
                     "+ merges.txt, or tokenizer.model)",
                     hint="copy the tokenizer files of the model it was trained from into it "
                     "(tokenizer.save_pretrained writes them)")


def tokenizer(source: str, kwargs: dict[str, Any]) -> Any:
    """The tokenizer; a plain tokenizers-backed one without AutoTokenizer's class lookup,
    which imports transformers' model registry (~0.4 s)."""
    try:
        name = json.loads((Path(source) / "tokenizer_config.json").read_text(encoding="utf-8")
                          ).get("tokenizer_class")
    except (OSError, ValueError):
        name = None
    if name in ("TokenizersBackend", "PreTrainedTokenizerFast") and (
            Path(source) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(source, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def full_model(source: str, device: str, dtype: str, quantize: str, cache: Path | None,
                kwargs: dict[str, Any], base: str | None = None) -> tuple[Any, str]:
    """transformers' model, quantized as asked, in eval mode on ``device``. ``base``: where
    the base model of the LoRA adapter directory ``source`` is read from."""
    import torch
    from transformers import AutoModelForCausalLM

    load_dtype = "float32" if quantize != "none" else dtype  # quantize from the float32 weights
    model = AutoModelForCausalLM.from_pretrained(
        base or source, dtype=getattr(torch, load_dtype), use_safetensors=True, **kwargs
    )
    if base is not None:
        model.load_adapter(source)
    if quantize != "none":
        quantize = quantized.quantize_model(model, quantize, cache=cache)
        # Cast to the compute dtype, but keep the RoPE frequencies in float32, as
        # from_pretrained(dtype=...) does: cast, they would shift every position's angle.
        rope = {name: b for name, b in model.named_buffers() if name.endswith("inv_freq")}
        model.to(getattr(torch, dtype))
        for name, buffer in rope.items():
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, buffer)
    model.to(device)
    model.eval()
    return model, quantize


def load_error(display: str, exc: BaseException) -> ModelError:
    """A loading failure as one line, with a hint where the cause is known."""
    hint = None
    if "trust_remote_code" in str(exc):
        hint = "this model runs code of its own; pass --trust-remote-code if you trust it"
    elif type(exc).__name__ == "SafetensorError" or "header" in str(exc).lower():
        hint = "the weights file is damaged or incomplete: copy or save the model again"
    elif "safetensors" in str(exc):
        hint = "nlgen loads only safetensors weights; convert the model with save_pretrained"
    return ModelError(f"cannot load model {display!r}: {first_line(exc)}", hint=hint)
