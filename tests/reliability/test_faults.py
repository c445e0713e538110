"""Faults of an unlucky machine and loop (issue 15): a kill during a checkpoint save, a full disk, two runs in
one directory, a diverging loss, a resume at max_steps. Each checks what is left: the last good state, no
half-written file, no extra optimizer step."""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from finetune.train.guards import NonFiniteGuard, NonFiniteTraining
from finetune.train.lock import RunLock
from finetune.train.manifest import manifest_problem
from tests.reliability.cases import FAST
from tests.reliability.harness import half_written, run_inprocess
from tests.support import REPO


def _copy_run(art, dest: Path, *drop: str) -> Path:
    # dropped while copying: on the small tmpfs the whole run would not fit first
    shutil.copytree(art["run"], dest, ignore=lambda folder, names: [n for n in names if Path(folder) == art["run"]
                                                                    and n in drop])
    return dest


def _train_steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def test_resume_at_max_steps_trains_no_extra_step(artifacts, tmp_path):
    """The adapter lost after the last checkpoint: resume restores checkpoint-2, it does not train a step 3."""
    run = _copy_run(artifacts, tmp_path / "run", "adapter", "merged")
    out = run_inprocess(["train", *FAST, "eval.enabled=false", f"hydra.run.dir={run}"])
    assert out.code == 0, out.text[-3000:]
    assert json.loads((run / "adapter" / "provenance.json").read_text())["steps"] == 2
    want = load_file(artifacts["run"] / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all((want[k] == got[k]).all() for k in want)  # bitwise: no optimizer step ran
    assert _train_steps(run / "metrics.jsonl") == [1, 2]
    assert not (run / "checkpoints" / "checkpoint-3").exists()


def test_resume_skips_a_damaged_checkpoint_and_says_why(artifacts, tmp_path):
    run = _copy_run(artifacts, tmp_path / "run", "adapter", "merged")
    opt = run / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated optimizer state
    assert "optimizer.pt has 100 bytes" in manifest_problem(opt.parent)
    out = run_inprocess(["train", *FAST, "eval.enabled=false", "merge.enabled=false", f"hydra.run.dir={run}"])
    assert out.code == 0, out.text[-3000:]
    assert "skipping checkpoint" in out.text and "checkpoint-2" in out.text and "truncated" in out.text
    assert json.loads(out.stdout.strip().splitlines()[-1])["resumed_from"].endswith("checkpoint-1")
    assert _train_steps(run / "metrics.jsonl") == [1, 2]  # step 2 trained again, logged once


@pytest.mark.parametrize("overrides, words", [
    # warmup makes step 1's lr 0 and step 2's 1e30: the weights stay finite (~1e27) but the forward overflows,
    # which the final eval loss shows
    ([], "eval_loss=nan"),
    # the same, where the eval stage scores every validation row and the trainer's final pass is left to it:
    # one validation batch through the final weights still shows the overflow
    (["eval.max_samples=null"], "eval_loss=nan on the first validation batch"),
    # no warmup: step 1 at lr=1e30 overflows the weights by step 2, which the per-step weight check sees
    (["train.warmup_steps=0", "train.max_steps=3"], "diverged at step 2"),
])
def test_diverging_training_stops_with_the_step_and_publishes_nothing(tmp_path, overrides, words):
    """learning_rate=1e30 is finite, so the schema accepts it; training must stop and publish no adapter."""
    run = tmp_path / "run"
    out = run_inprocess(["train", *FAST, "train.learning_rate=1e30", *overrides, f"hydra.run.dir={run}"])
    assert out.code == 2 and not out.traceback, out.text[-3000:]
    assert words in out.text and "train.learning_rate" in out.text, out.text[-3000:]
    assert not (run / "adapter").exists() and not (run / "merged").exists()
    assert not half_written(run)


def test_guard_stops_on_a_non_finite_logged_loss_or_grad_norm():
    args = SimpleNamespace(learning_rate=2e-4, max_grad_norm=1.0, output_dir="ckpt")
    state = SimpleNamespace(global_step=7, log_history=[])
    for logs in ({"loss": math.nan}, {"loss": 1.0, "grad_norm": math.inf}):
        with pytest.raises(NonFiniteTraining, match="diverged at step 7"):
            NonFiniteGuard().on_log(args, state, None, logs=logs)
    NonFiniteGuard().on_log(args, state, None, logs={"loss": 1.0, "grad_norm": 0.5})  # finite: no error


def test_disk_full_during_merge_on_a_real_tmpfs(artifacts, tmp_path):
    """The run on a tmpfs with room for itself but not for merged/ (3 MB of fp32 weights): a message with the
    free space, no merged/ and no temporary folder left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    keep = [f for f in artifacts["run"].rglob("*") if f.is_file() and not {"merged", "checkpoints"} & set(f.parts)]
    # tmpfs rounds every file up to a 4 KiB page; 1 MiB more leaves no room for the 3 MB of merged fp32 weights
    size_kb = sum(-(-f.stat().st_size // 4096) * 4 for f in keep) + 64 * len(keep) + 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mount -t tmpfs is not allowed here (test_disk_full_during_checkpoint_save covers ENOSPC)")
    try:
        run = _copy_run(artifacts, mnt / "run", "merged", "checkpoints")
        out = run_inprocess(["merge", f"run={run}", "device=cpu"])
        assert out.code == 2 and not out.traceback, out.text[-3000:]
        assert "disk full" in out.text and "MiB free" in out.text
        assert not (run / "merged").exists() and not half_written(run)
        assert (run / "adapter" / "adapter_model.safetensors").is_file()  # the last good state
    finally:
        subprocess.run(["umount", "-l", str(mnt)])  # lazy: a file still open in this process must not keep it


def test_disk_full_during_checkpoint_save(artifacts, tmp_path, monkeypatch):
    """ENOSPC while the Trainer writes optimizer.pt of checkpoint-2 (simulated: torch.save raises it, as a full
    tmpfs would; the tmpfs test above covers a real one): checkpoint-1 stays, no staging folder is left, and the
    message says how big a checkpoint is."""
    import torch

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "checkpoint-2" in str(f) and str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    out = run_inprocess(["train", *FAST, f"hydra.run.dir={run}"])
    assert out.code == 2 and not out.traceback, out.text[-3000:]
    assert "disk full" in out.text and "checkpoint needs about" in out.text and "last good one is kept" in out.text
    assert manifest_problem(run / "checkpoints" / "checkpoint-1") is None
    assert not (run / "checkpoints" / "checkpoint-2").exists() and not half_written(run)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    real = torch.save
    def save(obj, f, *a, **k):
        real(obj, f, *a, **k)
        if "checkpoint-2" in str(f) and str(f).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: optimizer written, scheduler/state/manifest not
    torch.save = save
    from finetune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_checkpoint_save_resumes_to_the_same_adapter(artifacts, tmp_path):
    run = tmp_path / "run"
    args = ["train", *FAST, "merge.enabled=false", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], env=env, capture_output=True,
                            text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "checkpoints" / "checkpoint-2").exists()  # never published half
    assert list((run / "checkpoints").glob(".tmp-*")) and (run / ".lock").exists()  # what the kill left
    out = run_inprocess(args)
    assert out.code == 0, out.text[-3000:]
    assert "stale lock" in out.text and not half_written(run)
    assert _train_steps(run / "metrics.jsonl") == [1, 2]
    want = load_file(artifacts["run"] / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


def test_two_runs_in_one_directory(tmp_path):
    """A second run into a directory a live run holds is refused naming the process; after that process dies
    (SIGKILL: no cleanup) its lock is stale and taken over."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from finetune.train.lock import RunLock
        RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = run_inprocess(["train", *FAST, f"hydra.run.dir={run}"])
        assert out.code == 2 and not out.traceback, out.text[-3000:]
        assert f"in use by another run (process {holder.pid}" in out.text
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(run).acquire()  # stale now: taken over
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / ".lock").exists()


def test_resume_with_changed_values_when_allowed_records_them(artifacts, tmp_path):
    run = _copy_run(artifacts, tmp_path / "run", "adapter", "merged")
    out = run_inprocess(["train", *FAST, "train.max_steps=3", "train.allow_changes=true", "merge.enabled=false",
                         f"hydra.run.dir={run}"])
    assert out.code == 0, out.text[-3000:]
    notes = [line for line in (run / "config.yaml").read_text().splitlines() if line.startswith("# changed")]
    assert notes == ["# changed on resume at step 2 (train.allow_changes=true): train.max_steps: 2 -> 3"]
    assert _train_steps(run / "metrics.jsonl") == [1, 2, 3]


def test_overwrite_starts_over_without_duplicate_steps(artifacts, tmp_path):
    run = _copy_run(artifacts, tmp_path / "run")
    out = run_inprocess(["train", *FAST, "train.resume=never", "train.overwrite=true", "merge.enabled=false",
                         f"hydra.run.dir={run}"])
    assert out.code == 0, out.text[-3000:]
    assert _train_steps(run / "metrics.jsonl") == [1, 2] and not (run / "merged").exists()


def test_leftovers_of_crashed_writes_are_cleaned_on_the_next_run(artifacts, tmp_path):
    run = _copy_run(artifacts, tmp_path / "run")
    for name in (".tmp-adapter-abc", ".merged.tmp-def", ".tmp-old-merged-x", "export/.gguf-f16.tmp-1"):
        (run / name).mkdir(parents=True)
    (run / "config.yaml.x1y2.tmp").write_text("half")
    out = run_inprocess(["train", *FAST, f"hydra.run.dir={run}"])  # finished: cleans, trains nothing
    assert out.code == 0 and "is finished" in out.text, out.text[-3000:]
    assert not half_written(run) and not (run / ".lock").exists()


def test_published_adapter_has_no_pickle_normal_modes_and_provenance(artifacts):
    adapter = artifacts["run"] / "adapter"
    assert not (adapter / "training_args.bin").exists()
    umask = os.umask(0)
    os.umask(umask)
    for f in [adapter, *adapter.iterdir()]:
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert f.stat().st_mode & 0o777 == want, f
    assert (artifacts["run"] / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~umask
    prov = json.loads((adapter / "provenance.json").read_text())
    merged = json.loads((artifacts["run"] / "merged" / "provenance.json").read_text())
    assert prov["base"]["config_sha256"] and prov["base"]["weights_fingerprint"] and prov["adapter_sha256"]
    assert merged["base"] == prov["base"] and merged["adapter_sha256"] == prov["adapter_sha256"]


def test_eval_report_names_the_base_and_adapter_it_scored(artifacts, tmp_path):
    run = _copy_run(artifacts, tmp_path / "run")
    out = run_inprocess(["eval", f"run={run}", "device=cpu", "eval.compare_base=false", "eval.max_samples=1",
                         "eval.max_new_tokens=2"])
    assert out.code == 0, out.text[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    adapter = json.loads((run / "adapter" / "provenance.json").read_text())
    assert report["provenance"]["adapter_sha256"] == adapter["adapter_sha256"]
    assert report["provenance"]["base"] == adapter["base"]
