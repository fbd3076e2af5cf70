"""LoRA adapters: the base model an adapter directory names, and a switch to turn them off.

``nlgen finetune --lora --no-merge`` writes an adapter directory; loading it gives the base
model with the adapter applied. Switched off, the same weights in memory are the base model,
so a comparison of the two needs one copy (nlgen.score.compare's ``reference_ctx``).

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

# What runs the reference model of a comparison: a context in which the model's forward is the
# reference's (an adapter switched off), or a no-op where the reference is a model of its own.
ReferenceContext = Callable[[], AbstractContextManager[Any]]


def adapter_base(model_dir: str) -> str | None:
    """The base model a LoRA adapter directory names (adapter_config.json), else None: as
    ``nlgen finetune --model`` was given it (``builtin``, a Hub id, a path)."""
    path = Path(model_dir).expanduser() / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def same_model(a: str, b: str) -> bool:
    """Do two --model values name the same model (the same string, or the same directory)?"""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def adapter_switch(model: Any) -> ReferenceContext | None:
    """A context that switches `model`'s LoRA adapters off (the base model), or None.

    A peft ``PeftModel`` (finetune --lora) has ``disable_adapter()``. A transformers model that
    loaded an adapter directory has ``disable_adapters()``, but transformers 5 refuses it below
    peft 0.22; it only toggles each adapter layer, which we do here ourselves.
    """
    if callable(getattr(model, "disable_adapter", None)):
        return model.disable_adapter  # type: ignore[no-any-return]
    if not getattr(model, "_hf_peft_config_loaded", False):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    if not layers:
        return None

    @contextlib.contextmanager
    def switched_off() -> Iterator[None]:
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    return switched_off
