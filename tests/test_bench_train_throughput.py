"""benchmarks/train_throughput.py: the rows it generates, and a smoke run on the embedded tiny model."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tests.support import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _module():
    return load_script(SCRIPT, "bench_train_throughput")


def test_rows_follow_the_documented_length_distribution():
    """Word counts come from log-normal token targets (median 200, sigma 0.6), capped below max_length."""
    tt = _module()
    per_word = 1.3
    rows = tt.make_rows(2000, per_word, max_tokens=512)
    words = [sum(len(m["content"].split()) for m in r["messages"]) for r in rows]
    tokens = [w * per_word + 12 for w in words]  # the inverse of make_rows' conversion
    assert abs(statistics.median(tokens) - tt.MEDIAN_TOKENS) < 15
    assert max(tokens) <= 512
    logs = [math.log(t) for t in tokens if t > 40]
    assert 0.45 < statistics.stdev(logs) < 0.65  # the redrawn tails narrow it a little
    reply_share = statistics.mean(len(r["messages"][1]["content"].split()) / w for r, w in zip(rows, words))
    assert abs(reply_share - tt.REPLY_SHARE) < 0.03
    assert tt.make_rows(50, per_word, 512) == tt.make_rows(50, per_word, 512)  # seeded


def test_bad_arguments_are_refused_with_the_reason():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rows", "3"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2 and "--rows must be >= 10" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--project-set", "train.packing"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_tiny_smoke_run_prints_both_rates_ratio_and_losses(tmp_path):
    """Both sides really train (one subprocess each) and the last line carries the figures: ~25 s here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--rows", "24", "--repeats", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("baseline_label_tokens_per_s", "project_label_tokens_per_s", "ratio", "baseline_val_loss",
                "project_val_loss"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert out["ratio"] == round(out["project_label_tokens_per_s"] / out["baseline_label_tokens_per_s"], 2)
    assert out["baseline_steps"] > 0 and out["project_steps"] > 0
    assert out["baseline_padding_overhead"] > 1.0  # the baseline pads; the packed side computes no pad tokens
    assert set(out["goals_met"]) == {"ratio>=2.0", "val_loss_within_5%"}
    # the printed list of what the project does differently comes from the real SFTConfig builders
    assert "packing: False -> True" in proc.stdout and "padding_free: False -> True" in proc.stdout
    assert "gradient_checkpointing: True -> False" in proc.stdout
    assert not list(tmp_path.iterdir())  # the work directory lives in the system temp dir and is removed
