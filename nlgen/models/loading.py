"""A model spec (nlgen.models.spec) -> a loaded model, on its device, in its dtype.

Every command loads its model through :func:`load_model`, so that the default-model fallback,
the offline check, the GGUF conversion cache, device and dtype choice behave the same everywhere.

torch and transformers are imported inside the functions that need them: importing this module
costs nothing, which keeps ``nlgen --help`` fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlgen.errors import ModelError
from nlgen.models import adapters, gguf, quantized, readers
from nlgen.models.devices import (
    check_device_spec,
    check_dtype_spec,
    cpu_snapshot,
    resolve_device,
    resolve_dtype,
    spare_threads,
)
from nlgen.models.spec import (
    BUILTIN,
    BUILTIN_NAME,
    ModelSpec,
    choose_model,
    hub_reachable,
    offline_variable,
    resolve_spec,
)

log = logging.getLogger("nlgen")

# (directory, dtype, quantize, int4 cache dir) -> (weights, their quantization) or (None, "none")
LeanReader = Callable[[Path, str, str, Path | None], tuple[Any, str]]


@dataclass
class LoadedModel:
    """A model ready to run, with what the user should see about it.

    A Llama read by nlgen.engine.lean_llama (generation on the CPU) has ``lean`` weights and builds
    transformers' model only when something asks for ``model`` (``loader``): a batch, beams,
    --logprobs. Until then neither its import (~1.7 s) nor its build is paid.
    """

    model: Any = field(repr=False)  # transformers PreTrainedModel, eval mode, on `device`
    tokenizer: Any  # transformers tokenizer, with a pad token
    name: str  # display name: "gpt2", "builtin (SmolLM2-135M-Instruct)", a path
    source: str  # the directory or Hub id the weights were read from
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", "float16"
    model_id: str = ""  # the --model value actually loaded: "builtin" after the default fell back
    quantization: str = "none"  # "int4" / "int8": weight-only, see nlgen.quantize
    lean: Any = field(default=None, repr=False)  # nlgen.engine.lean_llama.Weights, or None
    loader: Callable[[], Any] | None = field(default=None, repr=False)  # builds `model`
    # CPU threads to use, measured while loading: fewer than torch's when other processes kept
    # cores busy (devices.spare_threads); None: no advice. Applying it is the caller's choice.
    spare_threads: int | None = None

    @property
    def context_length(self) -> int:
        config = self.lean.config if self.lean is not None else self.model.config
        return context_length(config, self.tokenizer)

    @property
    def generation_config(self) -> Any:
        """The model's own generation config (None for a model without one)."""
        if self.lean is not None:
            return self.lean.generation_config
        return getattr(self.model, "generation_config", None)


def _get_model(self: LoadedModel) -> Any:
    if self._model is None and self.loader is not None:
        self._model, self.loader = self.loader(), None
        # The model holds the weights now: the lean forward reads them there (decode.stepper)
        # rather than keep the copy read from the files (~370 MB for the built-in model).
        self.lean = None
    return self._model


def _set_model(self: LoadedModel, value: Any) -> None:
    self._model = value


# Set after the dataclass is made, so that its __init__ stores `model` through the setter.
LoadedModel.model = property(_get_model, _set_model)  # type: ignore[assignment]


def context_length(cfg: Any, tokenizer: Any = None) -> int:
    """The longest sequence a model config's position embeddings allow."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 1024


def load_model(
    model: str | ModelSpec | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    purpose: str = "generate",
    quantize: str = "auto",
    lean_reader: LeanReader | None = None,
) -> LoadedModel:
    """Load the model named by ``--model`` (``None``: the default, ``gpt2``, else builtin).

    ``lean_reader`` (generation on the CPU): the engine's reader of the weights its own
    forward runs (nlgen.engine.lean_weights.read); where it reads a saved directory, the
    transformers model is built only when something asks for it (``LoadedModel.loader``).

    ``quantize`` (generation only): "auto" runs a GGUF model's 4-bit weights as they are when
    it computes in bfloat16 on the CPU (see nlgen.quantize); "int4" / "int8" quantize any model.
    """
    check_device_spec(device)
    check_dtype_spec(dtype)
    quantize = quantized.check_kind(quantize) if purpose == "generate" else "none"
    spec = model if isinstance(model, ModelSpec) else choose_model(model)
    if spec.kind == "hub":
        try:
            return _load_hub(spec, device, dtype, trust_remote_code, purpose, quantize,
                             lean_reader)
        except ModelError as exc:
            if spec.explicit:
                raise
            log.warning("default model %r unavailable (%s); using the built-in model %s",
                        spec.name, exc.message, BUILTIN_NAME)
            spec = resolve_spec(BUILTIN)
    if spec.kind in ("builtin", "gguf"):
        directory = gguf.converted_dir(Path(spec.path))
        display = f"builtin ({BUILTIN_NAME})" if spec.kind == "builtin" else spec.name
        return _load_pretrained(str(directory), display, device, dtype, trust_remote_code,
                                purpose, local_only=True, model_id=spec.name,
                                quantize=quantize, cache=directory, lean_reader=lean_reader)
    return _load_pretrained(spec.path, spec.name, device, dtype, trust_remote_code, purpose,
                            local_only=True, model_id=spec.name, quantize=quantize,
                            lean_reader=lean_reader)


def _load_hub(spec: ModelSpec, device: str, dtype: str, trust: bool, purpose: str,
              quantize: str, lean_reader: LeanReader | None) -> LoadedModel:
    from huggingface_hub import constants

    online = hub_reachable()
    try:
        return _load_pretrained(spec.path, spec.name, device, dtype, trust, purpose,
                                local_only=not online, model_id=spec.name, quantize=quantize,
                                lean_reader=lean_reader)
    except ModelError as exc:
        if not online:
            why = (f"{offline_variable()} is set" if constants.HF_HUB_OFFLINE
                   else "the Hugging Face Hub cannot be reached")
            raise ModelError(
                f"model {spec.name!r} is not in the local cache and {why}",
                hint="use --model builtin, a local directory or a .gguf file, "
                "or download it where there is network",
            ) from exc
        raise


def adapter_base_source(directory: Path) -> str | None:
    """Where the base model of a LoRA adapter directory is read from; None for a model.

    adapter_config.json names it as ``nlgen finetune --model`` was given: builtin, a .gguf
    file, a Hub id, or a directory (relative to where finetune ran, else to the adapter's
    own folder).
    """
    base = None if (directory / "config.json").is_file() else adapters.adapter_base(
        str(directory))
    if base is None:
        return None
    if not Path(base).expanduser().exists() and (directory.parent / base).exists():
        base = str(directory.parent / base)
    try:
        spec = resolve_spec(base)
    except ModelError as exc:
        raise ModelError(f"{exc.message} (the base model that {directory.name}/"
                         "adapter_config.json names)", hint=exc.hint) from None
    return str(gguf.converted_dir(Path(spec.path))) if spec.kind in ("builtin", "gguf") \
        else spec.path


def _load_pretrained(
    source: str, display: str, device: str, dtype: str, trust: bool, purpose: str,
    *, local_only: bool, model_id: str, quantize: str = "none", cache: Path | None = None,
    lean_reader: LeanReader | None = None,
) -> LoadedModel:
    window = cpu_snapshot()  # from here to the loaded weights: what do other processes use?
    import torch
    from safetensors import SafetensorError

    device = resolve_device(device)
    if quantize in ("int4", "int8") and dtype == "auto":
        dtype = "bfloat16"  # the quantized kernels compute in bfloat16
    dtype = resolve_dtype(dtype, device, purpose)
    quantize = quantized.choose(quantize, device=device, dtype=dtype, cacheable=bool(cache))
    kwargs: dict[str, Any] = {"trust_remote_code": trust, "local_files_only": local_only}

    base = adapter_base_source(Path(source)) if Path(source).is_dir() else None

    def full() -> tuple[Any, str]:
        model, kind = readers.full_model(source, device, dtype, quantize, cache, kwargs, base)
        if purpose == "generate":  # for inference only (nlgen.engine.packed relies on it)
            model.requires_grad_(False)
        return model, kind

    if Path(source).is_dir():
        readers.check_tokenizer_files(Path(source), display)
    try:
        tokenizer = readers.tokenizer(source, kwargs)
        lean, quantization = None, "none"
        if lean_reader is not None and purpose == "generate" and device == "cpu" \
                and Path(source).is_dir():
            lean, quantization = lean_reader(Path(source), dtype, quantize, cache)
        model, quantization = (None, quantization) if lean is not None else full()
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise readers.load_error(display, exc) from exc
    # Advice, not an action: how many threads a process should keep is the caller's decision
    # (the CLI takes it; a library user's process is theirs).
    threads = spare_threads(window, torch.get_num_threads()) if device == "cpu" else None
    if tokenizer.pad_token is None:
        # Batched generation pads; a model without a pad token pads with EOS (masked out anyway).
        tokenizer.pad_token = tokenizer.eos_token

    def later() -> Any:  # the lean load's transformers model, when something asks for it
        try:
            return full()[0]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise readers.load_error(display, exc) from exc

    return LoadedModel(model, tokenizer, display, source, device, dtype, model_id, quantization,
                       lean=lean, loader=later if lean is not None else None,
                       spare_threads=threads)
