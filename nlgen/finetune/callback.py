"""The Trainer callback: progress events, samples, evaluations, and Ctrl-C's checkpoint.

This module imports torch and transformers at the top: ``nlgen.finetune.run`` imports it only
when a run starts, so ``nlgen --help`` never pays for them.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from nlgen.finetune.events import Evaluation, Event, Sample, StepProgress
from nlgen.finetune.options import FinetuneOptions
from nlgen.score.scoring import safe_exp


class Interrupt:
    """Ctrl-C during training asks for a checkpoint at the end of the step; a second one quits.

    SIGTERM does the same: it is what a scheduler or a container runtime sends before its kill.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class NlgenCallback(TrainerCallback):
    """Turns the Trainer's hooks into nlgen events; stops and checkpoints on Ctrl-C."""

    def __init__(self, on_event: Callable[[Event], None] | None, interrupt: Interrupt,
                 opts: FinetuneOptions, tokenizer: Any) -> None:
        self.on_event = on_event
        self.interrupt = interrupt
        self.opts = opts
        self.tokenizer = tokenizer
        self.loss: float | None = None
        self.lr: float | None = None
        self.step_time = 0.0
        self.step_started: float | None = None
        self.tokens_at_start = 0
        self.steps_at_start = 0
        self.stopped_at: int | None = None
        self.phase = "before"  # what an evaluation now measures: before | epoch | end
        # False: the last step's validation loss is measured after training, by the float32
        # pass that measures the KL too (packed text on one process): the Trainer skips it.
        self.final_evaluation = True

    def _emit(self, event: Event, state: Any) -> None:
        if self.on_event is not None and state.is_world_process_zero:
            self.on_event(event)

    def _progress(self, state: Any, logged: bool) -> StepProgress:
        done = state.global_step - self.steps_at_start
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        rate = tokens / self.step_time if self.step_time > 0 else 0.0
        eta = self.step_time / done * (state.max_steps - state.global_step) if done else None
        return StepProgress(state.global_step, state.max_steps, state.epoch or 0.0, self.loss,
                            self.lr, rate, eta, logged)

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "epoch"
        self.tokens_at_start = state.num_input_tokens_seen
        self.steps_at_start = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.step_started is not None:
            self.step_time += time.perf_counter() - self.step_started
            self.step_started = None
        self._emit(self._progress(state, logged=False), state)
        every = self.opts.sample_every
        if every and state.global_step % every == 0 and state.is_world_process_zero and model:
            self._emit(Sample(state.global_step, self._sample(model)), state)
        if state.global_step >= state.max_steps:
            if not self.opts.keep_checkpoints:
                # The Trainer checkpoints the last step (weights and optimizer: 3x the model)
                # for a run about to save its model anyway and drop its checkpoints: skip it.
                control.should_save = False
            if not self.final_evaluation:
                control.should_evaluate = False
        if self._stop_requested(args):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def _stop_requested(self, args: Any) -> bool:
        flag = self.interrupt.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others wait forever.
            t = torch.tensor([1.0 if flag else 0.0], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    @torch.no_grad()
    def _sample(self, model: Any) -> str:
        was_training = model.training
        model.eval()
        tokenizer, prompt = self.tokenizer, self.opts.sample_prompt
        try:
            device = next(model.parameters()).device
            if prompt:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            else:
                ids = torch.tensor([[tokenizer.eos_token_id]])
            ids = ids.to(device)
            # Greedy: sampling would draw from the global RNG and change the training run.
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=self.opts.sample_max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True)
            return prompt + text
        finally:
            if was_training:
                model.train()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.lr = float(logs.get("learning_rate", self.lr or 0.0))
            self._emit(self._progress(state, logged=True), state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # interrupted: no evaluation, already saved
            control.should_evaluate = False
            control.should_save = False
        elif state.global_step >= state.max_steps and not self.final_evaluation:
            control.should_evaluate = False
        return control

    def measured_after(self, state: Any, before: float, after: float) -> None:
        """The validation losses that the pass after training measured (before: the base's):
        into the log history (the curve, the record) and out as events, as the Trainer's."""
        state.log_history.append({"eval_loss": after, "epoch": state.epoch,
                                  "step": state.global_step})
        self._emit(Evaluation(0, 0.0, before, safe_exp(before), "before"), state)
        self._emit(Evaluation(state.global_step, state.epoch or 0.0, after, safe_exp(after),
                              "end"), state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        self._emit(Evaluation(state.global_step, state.epoch or 0.0, loss, safe_exp(loss),
                              self.phase), state)
