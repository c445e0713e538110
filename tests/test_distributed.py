"""Data-parallel training through torchrun (gloo, CPU) and the launch checks that run before any model loads."""
import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO, run_cli
from finetune.distributed import Launch, launch_info, launch_problems


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory):
    """The same 4 steps with a global batch of 4 rows: 2 processes x 2 rows, and 1 process x 4 rows."""
    root = tmp_path_factory.mktemp("ddp")
    common = ["train.max_steps=4", "train.global_batch_size=4", "merge.enabled=false", "train.save_steps=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "finetune", "train",
         *common, "train.per_device_train_batch_size=2", f"hydra.run.dir={root / 'ddp'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = run_cli("train", *common, "train.per_device_train_batch_size=4", f"hydra.run.dir={root / 'single'}")
    assert single.returncode == 0, single.stderr[-4000:]
    return root, ddp, single


def test_both_ranks_end_with_identical_adapters(ddp_and_single):
    _, ddp, _ = ddp_and_single
    summaries = [json.loads(line) for line in ddp.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert len(summaries) == 1  # rank 0 alone prints the summary (and merges, plots, evaluates)
    sums = summaries[0]["rank_adapter_sha256"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_loss_curve_matches_single_process_with_same_global_batch(ddp_and_single):
    root, _, _ = ddp_and_single
    a, b = losses(root / "ddp"), losses(root / "single")
    assert len(a) == len(b) == 4  # one record per step: only rank 0 writes metrics.jsonl
    for x, y in zip(a, b):
        assert abs(x - y) <= 2e-3 * abs(y), (a, b)


def test_only_rank_zero_writes_artifacts(ddp_and_single):
    root, _, _ = ddp_and_single
    run = root / "ddp"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "data" / "stats.json").is_file() and (run / "plots" / "loss.png").is_file()
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))
    # both ranks load the model; the run's log file is rank 0's alone (rank 1 logs to the console)
    assert (run / "train.log").read_text().count("loaded embedded:tiny") == 1
    assert "loaded embedded:tiny" in ddp_and_single[1].stderr + ddp_and_single[1].stdout


def test_ranks_above_zero_keep_out_of_the_run_files():
    from finetune.cli import _quiet_rank_overrides

    assert _quiet_rank_overrides([], {"RANK": "0"}) == [] and _quiet_rank_overrides([], {}) == []
    assert _quiet_rank_overrides([], {"RANK": "1"}) == ["hydra/job_logging=stdout", "hydra.output_subdir=null"]
    assert _quiet_rank_overrides(["hydra/job_logging=disabled"], {"RANK": "3"}) == ["hydra.output_subdir=null"]


@pytest.mark.parametrize("env,overrides,expect", [
    ({"WORLD_SIZE": "4"}, ["train.global_batch_size=6", "train.per_device_train_batch_size=4"],
     "train.global_batch_size=6 is not divisible by world size 4"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "quant.storage_dtype"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed was requested"),
    ({}, ["train.deepspeed=ds.json"], "DeepSpeed was requested"),
])
def test_bad_launch_setups_fail_before_any_model_loads(tmp_path, env, overrides, expect):
    res = run_cli("train", *overrides, f"hydra.run.dir={tmp_path}", env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert expect in res.stderr and "Traceback" not in res.stderr
    assert "loaded embedded:tiny" not in res.stderr  # refused before the weights load
    assert not (tmp_path / "config.yaml").exists()


def test_fsdp_with_float_storage_passes_the_check():
    launch = launch_info({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"})
    assert launch.engine == "fsdp"
    ok = launch_problems(launch=launch, per_device_batch=2, global_batch=8, quant_method="nf4",
                         storage_dtype="bfloat16", deepspeed_config=None)
    assert ok == []
    # global_batch_size replaces gradient_accumulation_steps (derived from it)
    derived = launch_problems(launch=Launch(2, 0, "ddp"), per_device_batch=2, global_batch=8,
                              quant_method="none", storage_dtype=None, deepspeed_config=None)
    assert derived == []
