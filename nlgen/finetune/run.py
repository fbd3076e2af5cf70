"""The run itself: check everything, load the model, train with the Trainer, save atomically.

Order matters: everything that can fail on the user's input (data, output directory, resume
settings, precision) is checked before the model loads, and nothing is written before the
first training step.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from nlgen.errors import InputError, OutputError, UsageError, first_line, write_failure
from nlgen.finetune import artifacts, examples
from nlgen.finetune.chat import TEXT, end_of_turn_ids
from nlgen.finetune.curve import loss_rows as curve_rows
from nlgen.finetune.data import PackedData, prepare_data
from nlgen.finetune.divergence import kl_runs, validation_kl
from nlgen.finetune.events import Event, FinetuneResult, Started, TrainingInterrupted
from nlgen.finetune.options import FinetuneOptions
from nlgen.inputs import STDIN, Source, check_sources, check_text_field
from nlgen.jobs import distributed
from nlgen.models import loading
from nlgen.models.devices import cpu_has_fast_bf16
from nlgen.models.spec import choose_model
from nlgen.score.scoring import safe_exp

log = logging.getLogger("nlgen")

MAX_DEFAULT_BLOCK = 1024


def finetune(opts: FinetuneOptions, on_event: Callable[[Event], None] | None = None,
             command: str | None = None) -> FinetuneResult:
    """Check everything, fine-tune, and write the model directory atomically."""
    with warnings.catch_warnings():
        # peft and the Trainer still call transformers names deprecated for v6; not the user's.
        warnings.filterwarnings("ignore", message=r".*will be removed in v6.*",
                                category=FutureWarning)
        return _run(opts, on_event, command)


def _run(opts: FinetuneOptions, on_event: Callable[[Event], None] | None,
         command: str | None) -> FinetuneResult:
    started = time.time()
    # 1. Inputs, output directory, resume settings: before anything heavy runs or is written.
    sources, validation, fmt, records = _check_inputs(opts)
    spec = choose_model(opts.model)
    plan = artifacts.plan_output(opts, spec.name)
    precision, use_cpu = resolve_precision(opts.precision, opts.device)
    settings = artifacts.run_settings(opts, sources, validation, distributed.world_size())
    settings["precision"] = precision  # what auto chose: a resumed run trains as it did
    if plan.resume_from is not None:
        artifacts.check_resume_settings(plan.checkpoints, settings)
    report_to = check_report_to(opts.report_to)

    # 2. The model, through the same loader as every other command.
    lm = loading.load_model(spec, device="cpu", dtype="float32",
                            trust_remote_code=opts.trust_remote_code, purpose="train")
    block_size = _block_size(opts, lm.context_length)
    model = _trainable(lm.model, opts)

    # 3. Data, tokenized and packed once (the main process first; the others read its cache).
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from nlgen.finetune.callback import Interrupt, NlgenCallback

    _clean_checkpoints(opts, plan)
    evaluate = bool(validation) or opts.split > 0
    args = _training_args(opts, plan, precision, use_cpu, report_to, evaluate,
                          padded=records is not None)
    if args.world_size > 1:  # accelerate has set up the process group by now
        distributed.know_peers()
    if records is None:
        data = prepare_data(sources, validation, opts, lm.tokenizer, block_size,
                            lambda: args.main_process_first(desc="tokenizing"))
    else:  # one sequence per example, masked: no packing
        data = examples.prepare_examples(records, opts, lm.tokenizer, block_size,
                                         end_of_turn_ids(lm.model), fmt)

    # 4. The run.
    interrupt = Interrupt()
    callback = NlgenCallback(on_event, interrupt, opts, lm.tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.validation, data_collator=_collator(data),
                      processing_class=lm.tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # it prints log dicts to stdout
    if on_event is not None and trainer.is_world_process_zero():
        on_event(_started(lm, data, opts, args, plan, precision))
    # Packed text on one process: the float32 pass after training that measures the KL gives
    # the validation loss of the base (before) and of the result (after) too; the Trainer's
    # evaluations before training and at the last step would repeat it.
    by_kl = data.format == TEXT and args.world_size == 1 and kl_runs(trainer, data)
    callback.final_evaluation = not by_kl
    before = _loss_before(trainer, data, plan, settings, measure=not by_kl)
    saving = artifacts.saving_checkpoints(plan.checkpoints, main=args.should_save)
    with interrupt, saving, _peers_watched(plan):
        train_out = trainer.train(
            resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    if callback.stopped_at is not None:
        raise TrainingInterrupted(callback.stopped_at,
                                  plan.checkpoints / f"checkpoint-{callback.stopped_at}")
    before, after, evals, kl, by_kl = _measured(trainer, lm, spec, data, opts, callback,
                                                by_kl, before)

    # 5. The model directory: a temporary sibling, renamed into place when complete.
    record = artifacts.build_record(
        opts, command=command, base={"name": lm.name, "source": lm.model_id}, sources=sources,
        validation=({"file": validation[0].name, "sha256": validation[0].sha256}
                    if validation else {"split": opts.split} if data.validation is not None
                    else None),
        hyperparameters={"learning_rate": opts.resolved_learning_rate,
                         "block_size": data.block_size, "precision": precision,
                         "precision_option": opts.precision},
        run={**_run_facts(trainer, train_out, callback, data, before, after, evals, plan),
             "validation_kl": kl,
             # by_kl: in float32 whatever the training precision; else in the Trainer's
             "validation_precision": "fp32" if by_kl else precision})
    curve = curve_rows(trainer.state.log_history, before)
    _save(trainer, lm.tokenizer, opts, plan, record, started, curve)
    return FinetuneResult(plan.output, record, trainer.is_world_process_zero())


def _clean_checkpoints(opts: FinetuneOptions, plan: Any) -> None:
    """--overwrite: the old checkpoints go; else what a kill in the middle of a save left."""
    if not distributed.is_main_process():
        return
    if opts.overwrite and plan.checkpoints.exists():
        shutil.rmtree(plan.checkpoints)
    else:
        artifacts.remove_incomplete_checkpoints(plan.checkpoints)


def _started(lm: Any, data: Any, opts: FinetuneOptions, args: Any, plan: Any,
             precision: str) -> Started:
    """The event that opens the run: what trains, on what, for how long, where it goes."""
    return Started(lm.name, len(data.train),
                   len(data.validation) if data.validation is not None else 0,
                   data.block_size, _planned_steps(data, opts, args.world_size),
                   precision, str(args.device), args.world_size, plan.output, plan.checkpoints,
                   artifacts.checkpoint_step(plan.resume_from) if plan.resume_from else None,
                   data.format)


def _measured(trainer: Any, lm: Any, spec: Any, data: Any, opts: FinetuneOptions,
              callback: Any, by_kl: bool, before: float | None,
              ) -> tuple[float | None, float | None, list[dict[str, Any]], float | None, bool]:
    """After training: (validation loss before, after, the evaluations, the KL against the
    base, whether the float32 KL pass gave the losses). Packed text on one process takes
    both losses from that pass; otherwise the Trainer's own evaluation gives them."""
    divergence = validation_kl(trainer, lm, spec, data, opts)
    kl = divergence.kl if divergence is not None else None
    if by_kl and divergence is not None and divergence.tokens:
        before = divergence.reference_nll_sum / divergence.tokens
        after = divergence.nll_sum / divergence.tokens
        callback.measured_after(trainer.state, before, after)
        return before, after, [e for e in trainer.state.log_history if "eval_loss" in e], kl, True
    after, evals = _loss_after(trainer, data, callback)
    return before, after, evals, kl, False


def _check_inputs(opts: FinetuneOptions) -> tuple[list[Source], list[Source], str,
                                                  examples.Records | None]:
    """The data files, their format (text, or records), and the records, checked."""
    if STDIN in (*opts.data, opts.validation_file) and distributed.world_size() > 1:
        raise UsageError("stdin ('-') reaches only one of the launched processes",
                         hint="save the text to a file and pass the file")
    sources = check_sources(opts.data, None)
    validation = check_sources([opts.validation_file], None) if opts.validation_file else []
    formats = examples.detect_formats(sources, opts.input_format)
    vformats = examples.detect_formats(validation, opts.input_format)
    fmt = examples.family(sources, formats)
    if validation and (examples.family(validation, vformats, "validation file") == TEXT) \
            != (fmt == TEXT):
        raise InputError(f"the validation file {validation[0].name} is not of the training "
                         f"data's kind ({fmt})", hint="give held-out data of the same format")
    if fmt == TEXT:
        for s in sources + validation:
            check_text_field(s, opts.text_field)
        return sources, validation, fmt, None
    return sources, validation, fmt, examples.read_records(sources, validation, formats,
                                                           vformats, opts.skip_bad)


def _collator(data: PackedData) -> Any:
    from transformers import default_data_collator

    return data.collator or default_data_collator


def _block_size(opts: FinetuneOptions, context: int) -> int:
    block_size = opts.block_size or min(context, MAX_DEFAULT_BLOCK)
    if block_size > context:
        raise UsageError(f"--block-size {block_size} is larger than the model's context "
                         f"({context} tokens)", hint=f"use --block-size {context} or less")
    return block_size


def _trainable(model: Any, opts: FinetuneOptions) -> Any:
    if opts.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless in training and clashes with it
    if not opts.lora:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", r=opts.lora_r, lora_alpha=opts.lora_alpha,
                        lora_dropout=opts.lora_dropout,
                        target_modules=list(opts.lora_target) or None)
    try:
        with warnings.catch_warnings():
            # peft tells that it switched GPT-2's Conv1D layers to fan_in_fan_out: as it should.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            return get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"cannot apply LoRA to this model: {first_line(exc)}",
                         hint="name the layers to adapt with --lora-target") from None


def _training_args(opts: FinetuneOptions, plan: artifacts.Plan, precision: str, use_cpu: bool,
                   report_to: list[str], evaluate: bool, padded: bool = False) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(plan.checkpoints),
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        num_train_epochs=opts.resolved_epochs,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        learning_rate=opts.resolved_learning_rate,
        weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=use_cpu,
        activation_checkpointing=opts.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Loss only: evaluation never keeps (batch, block, vocab) logits around.
        prediction_loss_only=True,
        eval_accumulation_steps=1,
        logging_strategy="steps",
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        report_to=report_to or "none",
        include_num_input_tokens_seen="non_padding" if padded else "all",
        disable_tqdm=True,  # progress is ours
        log_level="error",
        log_level_replica="error",
        eval_strategy=("steps" if opts.eval_steps else "epoch") if evaluate else "no",
        eval_steps=opts.eval_steps,
        dataloader_num_workers=0,
        # Records are padded per batch: batches of examples of like length (drawn at random
        # in groups of 50 batches, as transformers' LengthGroupedSampler does) carry little
        # padding. Packed text blocks are all one length.
        train_sampling_strategy="group_by_length" if padded else "random",
    )


def _loss_before(trainer: Any, data: PackedData, plan: artifacts.Plan,
                 settings: dict[str, Any], measure: bool = True) -> float | None:
    """Validation loss before training: measured on a fresh run, read back on a resumed one
    (``measure=False``: measured after training, with the KL)."""
    if plan.resume_from is not None:
        return artifacts.read_state(plan.checkpoints).get("before_loss")
    before = trainer.evaluate()["eval_loss"] if data.validation is not None and measure \
        else None
    if trainer.is_world_process_zero():
        artifacts.write_state(plan.checkpoints, settings, before)
    return before


def _loss_after(trainer: Any, data: PackedData, callback: Any) -> tuple[float | None, list]:
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if data.validation is None:
        return None, evals
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return evals[-1]["eval_loss"], evals
    callback.phase = "end"
    after = trainer.evaluate()["eval_loss"]
    return after, [e for e in trainer.state.log_history if "eval_loss" in e]


def _run_facts(trainer: Any, train_out: Any, callback: Any, data: PackedData,
               before: float | None, after: float | None, evals: list,
               plan: artifacts.Plan) -> dict[str, Any]:
    runtime = train_out.metrics.get("train_runtime")
    tokens = trainer.state.num_input_tokens_seen - callback.tokens_at_start
    facts = data.facts or {}
    return {
        "format": data.format,
        "train_blocks": len(data.train),  # records: examples (one sequence each)
        "validation_blocks": len(data.validation) if data.validation is not None else 0,
        "examples": facts or None,
        # Per pass over the training set: tokens the loss covers, tokens it does not.
        "trained_tokens": facts["train"]["trained_tokens"] if facts
        else len(data.train) * data.block_size,
        "masked_tokens": facts["train"]["masked_tokens"] if facts else 0,
        "training_text_tokens": data.train_tokens,
        "world_size": trainer.args.world_size,
        "device": str(trainer.args.device),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "train_runtime_s": runtime,
        "train_tokens_per_second": tokens / runtime if runtime else None,
        "final_train_loss": callback.loss,
        "validation_loss": {"before": before, "after": after},  # nats per trained token
        "validation_perplexity": {
            "before": safe_exp(before) if before is not None else None,
            "after": safe_exp(after) if after is not None else None,
            "evaluations": [{"step": e["step"], "epoch": e.get("epoch"),
                             "perplexity": safe_exp(e["eval_loss"])} for e in evals],
        },
        "resumed_from_step": (artifacts.checkpoint_step(plan.resume_from)
                              if plan.resume_from else None),
    }


def _save(trainer: Any, tokenizer: Any, opts: FinetuneOptions, plan: artifacts.Plan,
          record: dict[str, Any], started: float, curve: list[dict[str, Any]]) -> None:
    main = trainer.is_world_process_zero()
    tmp = artifacts.partial_dir(plan.output)
    if main and tmp.exists():
        shutil.rmtree(tmp)  # what a crash left behind
    trainer.accelerator.wait_for_everyone()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        from transformers.utils import logging as hf_logging

        # The Trainer turned transformers' bars on; the process had them off: off again.
        hf_logging.disable_progress_bar()
    from safetensors import SafetensorError

    try:
        if not (opts.lora and opts.merge):
            # Every process takes part: under FSDP or DeepSpeed the weights are gathered from
            # all of them; the main process alone writes.
            trainer.save_model(str(tmp))
        if main:
            artifacts.finish_output(trainer, tokenizer, opts, plan, record, started, curve)
    except (OSError, RuntimeError, SafetensorError) as exc:  # a full disk: nothing half-made
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(exc, plan.output.parent)
        if why is None:
            raise
        raise OutputError(f"cannot write the model to {plan.output}: {why}",
                          hint=artifacts.after_write_failure(plan.checkpoints) if main
                          else None) from None
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()


@contextmanager
def _peers_watched(plan: artifacts.Plan) -> Iterator[None]:
    """A rank that the launcher lost (a kill, the OOM killer) is named, not rank 0's own
    failing collective or the SIGTERM the launcher sends it."""
    try:
        yield
    except BaseException as exc:
        resumable = artifacts.last_checkpoint(plan.checkpoints) is not None
        lost = distributed.peer_failure(resumable=resumable) if distributed.is_distributed() \
            else None
        if lost is not None:
            raise lost from exc
        raise


def _planned_steps(data: PackedData, opts: FinetuneOptions, world_size: int) -> int:
    if opts.max_steps:
        return opts.max_steps
    batches = math.ceil(len(data.train) / (opts.batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / opts.gradient_accumulation_steps))
    return math.ceil(per_epoch * opts.resolved_epochs)


def resolve_precision(precision: str, device: str) -> tuple[str, bool]:
    """-> (precision, use_cpu). Mixed precision that this device cannot run is a usage error.

    ``auto`` is bf16 on a GPU that has it (else fp16), and on a CPU with native bfloat16
    arithmetic (AVX512-BF16 or AMX); else fp32. bf16 is mixed precision: the weights, their
    gradients and the optimizer stay float32, the matrix products run in bfloat16 (autocast).
    Measured on the built-in model (README, benchmarks/bench_finetune.py): ~1.45x the
    tokens/s of float32 on such a CPU; after 30 steps the validation loss on held-out text is
    within 0.1% of float32's, on blocks also trained on (memorizing) 2.4% higher.
    """
    import torch

    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    cuda = torch.cuda.is_available() and not use_cpu
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: CUDA is not available on this machine",
                         hint="use --device cpu or auto")
    if not cuda:
        if precision == "fp16":
            raise UsageError("--precision fp16 needs a CUDA GPU; this run is on the CPU",
                             hint="use --precision bf16 or fp32 here")
        if precision != "auto":  # bf16 runs on any CPU: slowly, emulated, without the
            return precision, True  # instructions, but as asked
        fast = cpu_has_fast_bf16()
        log.info("--precision auto: %s", "bf16 mixed precision (the CPU has native bfloat16 "
                 "arithmetic; weights stay float32)" if fast else "fp32 (the CPU has no native "
                 "bfloat16 arithmetic: AVX512-BF16 or AMX)")
        return ("bf16" if fast else "fp32"), True
    bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise UsageError("--precision bf16 is not supported by this GPU",
                         hint="use --precision fp16 or fp32")
    if precision == "auto":
        log.info("--precision auto: %s mixed precision on the GPU", "bf16" if bf16_ok else "fp16")
        return ("bf16" if bf16_ok else "fp16"), False
    return precision, False


def check_report_to(report_to: tuple[str, ...]) -> list[str]:
    wanted = [r for r in report_to if r != "none"]
    if not wanted:
        return []
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    if "all" in wanted:
        return available
    missing = [r for r in wanted if r not in available]
    if missing:
        raise UsageError(f"--report-to {', '.join(missing)}: not installed",
                         hint="install it (e.g. pip install tensorboard); installed: "
                         + (", ".join(available) or "none"))
    return wanted
