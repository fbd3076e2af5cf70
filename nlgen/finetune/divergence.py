"""How far fine-tuning moved the model: KL(base || result) on the validation blocks.

The blocks are those the validation perplexity is measured on, each read as one window (the
Trainer's evaluation: every token but a block's first is predicted). The base is the model
before training: for a LoRA run, the same weights with the adapter switched off (no second
copy); otherwise the base model loaded again, on the same device.

Runs on the main process only, and not when the weights are sharded across processes (FSDP,
DeepSpeed), where no one process holds the whole model.

Core module: no typer, no rich, no printing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nlgen.finetune.data import PackedData
from nlgen.finetune.options import FinetuneOptions
from nlgen.models import adapters, loading
from nlgen.models.spec import ModelSpec
from nlgen.score import compare
from nlgen.score.scoring import ScoreOptions

log = logging.getLogger("nlgen")


def kl_runs(trainer: Any, data: PackedData) -> bool:
    """Whether :func:`validation_kl` measures anything in this run (on this process)."""
    return (data.validation is not None and len(data.validation) > 0
            and trainer.is_world_process_zero()
            and not getattr(trainer, "is_fsdp_enabled", False)
            and not getattr(trainer, "is_deepspeed_enabled", False))


def validation_kl(trainer: Any, lm: loading.LoadedModel, spec: ModelSpec,
                  data: PackedData, opts: FinetuneOptions) -> compare.Divergence | None:
    """Both models on the validation blocks, in float32: KL(base || fine-tuned) per predicted
    token (``.kl``, nats), and each model's loss (``nll_sum`` and ``reference_nll_sum`` over
    ``tokens``): for packed text blocks, the validation loss after and before training."""
    if not kl_runs(trainer, data):
        if getattr(trainer, "is_fsdp_enabled", False) \
                or getattr(trainer, "is_deepspeed_enabled", False):
            log.info("validation KL skipped: the model is sharded across processes")
        return None
    model = trainer.model  # unwrapped (a PeftModel for a LoRA run)
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with _float32_forward(model):
            return _compare(model, lm, spec, data, opts, device)
    finally:
        model.train(was_training)


@contextmanager
def _float32_forward(model: Any) -> Iterator[None]:
    """The model's own forward, without the autocast that accelerate wraps around it in a
    mixed-precision run: the comparison is a measurement, in float32."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _compare(model: Any, lm: loading.LoadedModel, spec: ModelSpec, data: PackedData,
             opts: FinetuneOptions, device: str) -> compare.Divergence:
    if opts.lora:
        # The inner model keeps the body/head split of nlgen.score.kernel; the adapter layers
        # injected into it follow the PeftModel's switch.
        tuned = loading.LoadedModel(model.base_model.model, lm.tokenizer, lm.name,
                                    lm.source, device, "float32")
        against: dict[str, Any] = {"reference_ctx": adapters.adapter_switch(model)}
    else:
        tuned = loading.LoadedModel(model, lm.tokenizer, lm.name, lm.source, device,
                                    "float32")
        against = {"reference": loading.load_model(
            spec, device=device, dtype="float32", trust_remote_code=opts.trust_remote_code,
            purpose="train")}
    blocks = [list(ids) for ids in data.validation["input_ids"]]
    window = data.block_size
    comparer = compare.Comparer(tuned, ScoreOptions(max_length=window, stride=window,
                                                    batch_size=opts.batch_size), **against)
    return compare.total(comparer.compare_ids(blocks))
