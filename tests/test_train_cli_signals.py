"""The real `finetune train` stopped from outside. SIGKILL right after a checkpoint, then the same command in the
same run directory: the resumed adapter equals an uninterrupted run's (three CLI runs, about a minute here).
Ctrl-C (SIGINT): a checkpoint of the finished step and the exact command that resumes."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.support import REPO, run_cli

ARGS = ["train", "train.max_steps=6", "train.save_steps=2", "train.report_to=[]", "merge.enabled=false",
        "device=cpu"]


def start(run_dir, log_path, *args):
    log = log_path.open("w")  # a file, not a pipe: a full pipe would stall the trainer
    return subprocess.Popen([sys.executable, "-m", "finetune", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT), log


def wait_for(path, proc, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli(*ARGS, f"hydra.run.dir={ref_dir}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc, log = start(run_dir, tmp_path / "killed.log", *ARGS)
    first = run_dir / "checkpoints" / "checkpoint-2"
    wait_for(first, proc)  # the rename is atomic: once the name exists, the checkpoint is whole
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    log.close()
    assert first.is_dir() and not (run_dir / "adapter").exists(), "killed too late to test anything"

    resumed = run_cli(*ARGS, f"hydra.run.dir={run_dir}")  # train.resume=auto is the default
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["resumed_from"].rsplit("-", 1)[-1] in ("2", "4")

    a, b = adapter(ref_dir), adapter(run_dir)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # records the killed run wrote past its checkpoint were dropped


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_step_and_prints_the_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "train.max_steps=50", "train.save_steps=100", "train.report_to=[]", "merge.enabled=false",
            "device=cpu"]
    proc, log = start(run_dir, tmp_path / "run.log", *args)
    wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    log.close()
    text = (tmp_path / "run.log").read_text()
    step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"training stopped by SIGINT at step {step}" in text and "Traceback" not in text
    assert sorted((run_dir / "checkpoints").glob("checkpoint-*")) == [run_dir / f"checkpoints/checkpoint-{step}"]
    assert "resume with: " + shlex.join(["finetune", *args, f"hydra.run.dir={run_dir}"]) in text
