"""Trainer callbacks: metrics.jsonl, one JSON object per logged step."""
from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.runs import peak_memory_mb


class MetricsCallback(TrainerCallback):
    """Append each log record (loss, lr, grad norm, throughput, peak memory) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self._t0 = time.perf_counter()

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:  # one line per record; a crash loses at most one line
            f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.is_world_process_zero is False:
            return
        record = {"step": state.global_step, "elapsed_s": round(time.perf_counter() - self._t0, 3)}
        for key, value in logs.items():
            name = {"learning_rate": "lr"}.get(key, key)
            record[name] = value
        record["peak_memory_mb"] = round(peak_memory_mb(), 1)
        self.write(record)
