"""The timestamp that names a run directory, identical on every rank of a distributed launch.

Each torchrun / accelerate rank composes the config itself, so Hydra's ${now:} could differ between
ranks started either side of a second boundary and split one run over two directories. Ranks on one
machine share their launcher process, so under a launcher we name the run after the launcher's start
time instead. FINETUNE_RUN_STAMP overrides both (set it, or hydra.run.dir, for multi-machine runs).
"""
from __future__ import annotations

import os
import time
from datetime import datetime

FORMAT = "%Y-%m-%d_%H-%M-%S"


def _process_start_time(pid: int) -> float | None:
    """Start time of `pid` in seconds since the epoch (psutil: Linux, macOS, Windows), or None where unknown."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):  # gone, or not ours to inspect
        return None


def run_stamp() -> str:
    """FINETUNE_RUN_STAMP, else the launcher's start time under torchrun/accelerate, else now."""
    if os.environ.get("FINETUNE_RUN_STAMP"):
        return os.environ["FINETUNE_RUN_STAMP"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        started = _process_start_time(os.getppid())
        if started is not None:
            return datetime.fromtimestamp(started).strftime(FORMAT)
    return datetime.fromtimestamp(time.time()).strftime(FORMAT)
