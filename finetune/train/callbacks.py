"""Trainer callbacks: metrics.jsonl (one JSON object per log record), and stopping cleanly on a signal."""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

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
        done = state.global_step - (self._first_step or 0)
        if "loss" in logs and done > 0 and state.max_steps:
            record["eta_s"] = round(elapsed / done * (state.max_steps - state.global_step), 1)
        record["peak_memory_mb"] = round(peak_memory_mb(), 1)
        self.write(record)


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
