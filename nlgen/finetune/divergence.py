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
from typing import Any

from nlgen.finetune.data import PackedData
from nlgen.finetune.options import FinetuneOptions
from nlgen.models import adapters, loading
from nlgen.models.spec import ModelSpec
from nlgen.score import compare
from nlgen.score.scoring import ScoreOptions

log = logging.getLogger("nlgen")


def validation_kl(trainer: Any, lm: loading.LoadedModel, spec: ModelSpec,
                  data: PackedData, opts: FinetuneOptions) -> float | None:
    """Mean KL(base || fine-tuned) per predicted token of the validation blocks, nats."""
    if data.validation is None or len(data.validation) == 0 \
            or not trainer.is_world_process_zero():
        return None
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled",
                                                              False):
        log.info("validation KL skipped: the model is sharded across processes")
        return None
    model = trainer.model  # unwrapped (a PeftModel for a LoRA run)
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
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
        return compare.total(comparer.compare_ids(blocks)).kl
    finally:
        model.train(was_training)
