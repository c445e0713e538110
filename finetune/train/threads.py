"""CPU threads for a training run: one torch thread per physical core, nothing else competing for them, and a
loud warning when other processes already use the cores.

Why it matters: OpenMP threads spin while they wait. Two trainings sharing these 2 cores each ran 8-19x slower
than alone, and a profile then showed elementwise ops taking most of the time; hyper-threads share one core's
vector units, so a thread per logical CPU only adds contention. tokenizers' Rust pool (one thread per logical
CPU) and each DataLoader worker process are more of the same while torch computes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("finetune.train.threads")

# Other processes using at least half a core count as "busy": at two trainings on 2 cores (one other core's
# worth) timings were 8-19x off; half a core already costs torch's thread barrier a straggler on every op.
BUSY_CORES = 0.5


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int
    physical_cores: int
    reason: str


@dataclass(frozen=True)
class Busy:
    other_cores: float  # CPU time of processes other than this one (and its children), in cores
    load_average: float  # 1-minute load average (includes this process)
    cores: int
    top: tuple[tuple[str, int, float], ...]  # (name, pid, % of one core) of the busiest other processes

    @property
    def busy(self) -> bool:
        return self.other_cores >= BUSY_CORES

    def message(self) -> str:
        who = ", ".join(f"{name} (pid {pid}) {pct:.0f}%" for name, pid, pct in self.top) or "none sampled"
        return (f"this machine is busy: other processes use {self.other_cores:.1f} of {self.cores} cores ({who}); "
                f"load average {self.load_average:.2f}. Training and benchmark timings will be slow and not "
                "repeatable (two trainings sharing 2 cores each ran 8-19x slower than alone).")


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's physical count, capped by the CPU affinity mask (taskset,
    a container's cpuset)."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or allowed
    logical = psutil.cpu_count(logical=True) or allowed
    # with an affinity mask, count its CPUs as cores at the machine's threads-per-core ratio
    return max(1, min(physical, round(allowed * physical / logical)))


def configure_threads(dataloader_workers: int = 0) -> ThreadPlan:
    """Set torch's intra-op threads to one per physical core (minus one per DataLoader worker process) and keep
    tokenizers from starting its own pool. An OMP_NUM_THREADS the user set wins (torch read it at import).

    Call once on CPU before training starts; returns what was set and why (also logged)."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cores = physical_cores()
    if os.environ.get("OMP_NUM_THREADS"):
        plan = ThreadPlan(torch.get_num_threads(), cores,
                          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} set by the caller")
    else:
        threads = max(1, cores - max(0, dataloader_workers))
        why = f"{cores} physical cores" + (f" - {dataloader_workers} DataLoader workers" if dataloader_workers else "")
        torch.set_num_threads(threads)
        plan = ThreadPlan(threads, cores, why)
    log.info("torch threads: %d (%s); tokenizers parallelism %s", plan.torch_threads, plan.reason,
             os.environ["TOKENIZERS_PARALLELISM"])
    return plan


def other_processes() -> list:
    """psutil.Process of every process but this one and its children (a benchmark's workers are the work)."""
    import psutil

    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    return [p for p in psutil.process_iter(["name"]) if p.pid not in mine]


def sample_load(interval_s: float = 0.5) -> Busy:
    """CPU use of every other process over `interval_s` (psutil), this process and its children excluded."""
    import psutil

    procs = other_processes()
    for p in procs:
        try:
            p.cpu_percent(None)  # starts the interval
        except psutil.Error:
            pass
    time.sleep(interval_s)
    used = []
    for p in procs:
        try:
            used.append((p.info["name"] or "?", p.pid, p.cpu_percent(None)))
        except psutil.Error:
            pass
    used.sort(key=lambda u: -u[2])
    return Busy(other_cores=round(sum(u[2] for u in used) / 100, 2), load_average=round(os.getloadavg()[0], 2),
                cores=physical_cores(), top=tuple(u for u in used[:3] if u[2] >= 5))


def warn_if_busy(interval_s: float = 0.3) -> Busy:
    """Sample the machine and log a loud warning when other processes use the cores; returns the sample."""
    sample = sample_load(interval_s)
    if sample.busy:
        log.warning("%s\n%s\n%s", "!" * 100, "WARNING: " + sample.message(), "!" * 100)
    return sample
