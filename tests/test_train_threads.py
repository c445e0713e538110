"""finetune/train/threads.py: one torch thread per physical core, no tokenizers pool, and the busy-machine warning."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from finetune.train import threads
from finetune.train.threads import Busy


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_torch_thread_per_physical_core_minus_workers(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 3)
    plan = threads.configure_threads()
    assert plan.torch_threads == torch.get_num_threads() == 3 and plan.reason == "3 physical cores"
    assert threads.configure_threads(dataloader_workers=1).torch_threads == torch.get_num_threads() == 2
    assert threads.configure_threads(dataloader_workers=8).torch_threads == 1  # never zero
    import os

    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_omp_num_threads_from_the_caller_wins(monkeypatch, keep_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    plan = threads.configure_threads()
    assert plan.torch_threads == torch.get_num_threads() == 1 and "OMP_NUM_THREADS=1" in plan.reason


def test_physical_cores_is_capped_by_the_affinity_mask(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)  # 2 threads per core
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.physical_cores() == 2
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert threads.physical_cores() == 8


def test_busy_decision_and_message():
    quiet = Busy(other_cores=0.2, load_average=0.4, cores=2, top=())
    busy = Busy(other_cores=1.9, load_average=3.1, cores=2, top=(("python", 4242, 97.0), ("pip", 7, 60.0)))
    assert not quiet.busy and busy.busy
    assert busy.message().startswith("this machine is busy: other processes use 1.9 of 2 cores (python (pid 4242) "
                                     "97%, pip (pid 7) 60%); load average 3.10.")


def test_warning_is_loud_only_when_busy(monkeypatch, caplog):
    busy = Busy(other_cores=1.2, load_average=2.0, cores=2, top=(("python", 1, 100.0),))
    monkeypatch.setattr(threads, "sample_load", lambda interval_s: busy)
    with caplog.at_level(logging.WARNING, logger="finetune.train.threads"):
        assert threads.warn_if_busy() is busy
    assert "WARNING: this machine is busy" in caplog.text and "!" * 100 in caplog.text
    caplog.clear()
    monkeypatch.setattr(threads, "sample_load", lambda interval_s: Busy(0.0, 0.1, 2, ()))
    with caplog.at_level(logging.WARNING, logger="finetune.train.threads"):
        threads.warn_if_busy()
    assert not caplog.text


def test_own_children_are_not_counted_as_other_load():
    """A benchmark's own worker processes are the work, not competition."""
    import os

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        others = {p.pid for p in threads.other_processes()}
        sample = threads.sample_load(0.2)
    finally:
        child.kill()
        child.wait()
    assert child.pid not in others and os.getpid() not in others and os.getppid() in others
    assert sample.cores >= 1 and sample.other_cores >= 0 and sample.load_average >= 0
