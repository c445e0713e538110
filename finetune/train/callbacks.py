"""Trainer callbacks: metrics.jsonl (one JSON object per log record), the console progress bar, and stopping
cleanly on a signal."""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.distributed import progress
from finetune.files import peak_memory_mb

log = logging.getLogger("finetune.train.trainer")


class MetricsCallback(TrainerCallback):
    """Append each log record to metrics.jsonl: step, loss, lr, grad_norm, label_tokens_per_s (added by the
    trainer), peak_memory_mb, elapsed_s and eta_s; eval records carry eval_loss."""

    def __init__(self, path: Path):
        self.path = path
        self._t0 = time.perf_counter()
        self._first_step: int | None = None

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:  # one line per record; a crash loses at most one line
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._first_step = state.global_step  # > 0 after a resume: the ETA counts this session's steps only

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.is_world_process_zero is False:
            return
        elapsed = time.perf_counter() - self._t0
        record = {"step": state.global_step, "elapsed_s": round(elapsed, 3)}
        for key, value in logs.items():
            record[{"learning_rate": "lr"}.get(key, key)] = value
        eta = eta_s(state, elapsed, self._first_step)
        if "loss" in logs and eta is not None:
            record["eta_s"] = eta
        record["peak_memory_mb"] = round(peak_memory_mb(), 1)
        self.write(record)


def eta_s(state, elapsed: float, first_step: int | None) -> float | None:
    """Seconds left at this session's pace; after a resume only the steps run since count (first_step > 0)."""
    done = state.global_step - (first_step or 0)
    if done <= 0 or not state.max_steps:
        return None
    return round(elapsed / done * (state.max_steps - state.global_step), 1)


def console_fields(logs: dict) -> list[str]:
    """The parts of a log record a person watches: loss, learning rate, label tokens/s, eval loss."""
    out = []
    if "loss" in logs:
        out.append(f"loss {logs['loss']:.4f}")
    if "learning_rate" in logs:
        out.append(f"lr {logs['learning_rate']:.2e}")
    if "label_tokens_per_s" in logs:
        out.append(f"{logs['label_tokens_per_s']:,.0f} label tok/s")
    if "eval_loss" in logs:
        out.append(f"eval_loss {logs['eval_loss']:.4f}")
    return out


class ConsoleProgress(TrainerCallback):
    """One progress bar for the run, in place of transformers' ProgressCallback / PrinterCallback.

    Those print every log record as a raw dict over the bar (a dozen keys per step at logging_steps=1). Here
    the bar's postfix carries loss, learning rate and label tokens/s, and tqdm's own ETA sits in the bar;
    the whole record still goes to metrics.jsonl (MetricsCallback) and TensorBoard. Without a terminal (a log
    file, CI) the bar is off (finetune.distributed.progress) and each record becomes one short log line with
    the ETA instead. Rank 0 only.
    """

    def __init__(self):
        self.bar = None
        self.eval_bar = None
        self._t0 = time.perf_counter()
        self._first_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._t0, self._first_step = time.perf_counter(), state.global_step
        self.bar = progress(desc="train", total=state.max_steps, initial=state.global_step, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        from transformers.trainer_utils import has_length

        if self.bar is None or self.bar.disable:
            return
        if self.eval_bar is None and has_length(eval_dataloader):
            self.eval_bar = progress(desc="eval", total=len(eval_dataloader), unit="batch", leave=False)
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        fields = console_fields(logs or {})
        if self.bar is None or not fields:
            return
        if not self.bar.disable:
            self.bar.set_postfix_str(", ".join(fields))
            return
        eta = eta_s(state, time.perf_counter() - self._t0, self._first_step)
        if eta is not None and "loss" in logs:
            fields.append(f"eta {_clock(eta)}")
        log.info("step %d/%d: %s", state.global_step, state.max_steps, ", ".join(fields))

    def on_train_end(self, args, state, control, **kwargs):
        self.on_evaluate(args, state, control)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


class StopOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C (SIGINT) during training: finish the current step, save a checkpoint, stop.

    A second signal stops at once (the previous checkpoint stays whole). Used as a context manager around
    `trainer.train()` so the handlers are restored even when training raises. Under DDP every rank must stop
    at the same step, so the flag is max-reduced across ranks each step (one tiny collective).

    Not transformers' `enable_jit_checkpoint`: that handles SIGTERM only, waits 3 s, and may save between
    backward and optimizer step, after dropout has drawn from the RNG, so the resumed step differs from the
    uninterrupted one; stopping at a step boundary keeps resume exact.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:  # second signal: give up on the clean stop
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)", name)

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_everywhere(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _stop_everywhere(self, args) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        flag = torch.tensor([1 if self.received else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.received:
            self.received = "signal on another rank"
        return bool(flag.item())
