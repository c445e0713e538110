"""benchmarks/memory.py: a smoke run on a 2-layer shape (one fresh process per arm) and its argument checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"


def _run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_tiny_smoke_run_reports_both_peaks_and_ratio(tmp_path):
    """Build + three arms, each in its own process: about 28 s here."""
    proc = _run("--size", "tiny", "--arms", "qlora,qlora_bf16,lora16", "--steps", "2", "--seq-len", "32",
                "--keep", str(tmp_path / "work"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["qlora_peak_mb"] > 0 and out["lora16_peak_mb"] > 0 and out["bf16_copy_mb"] >= 0
    assert out["ratio"] == round(out["qlora_peak_mb"] / out["lora16_peak_mb"], 2)
    assert {"qlora_load_peak_mb", "qlora_load_peak_anon_mb", "lora16_load_peak_mb"} <= set(out)
    assert set(out["goals_met"]) == {"ratio<=0.5", "4-bit load below one bf16 copy"}
    arms = {d["arm"]: d for d in out["details"]}
    assert set(arms) == {"qlora", "qlora_bf16", "lora16"}
    assert out["ratio_bf16_compute"] == round(out["qlora_bf16_peak_mb"] / out["lora16_peak_mb"], 2)
    assert arms["qlora"]["quant"] == "nf4" and arms["qlora"]["compute_dtype"] == "float32"  # the CPU default
    assert arms["lora16"]["quant"] == "none" and arms["lora16"]["compute_dtype"] == "bfloat16"
    # the project's loader keeps the bf16 checkpoint's frozen table in bf16 under 4-bit, fp32 compute
    assert arms["qlora"]["embedding_dtype"] == arms["lora16"]["embedding_dtype"] == "bfloat16"
    for arm in arms.values():
        assert arm["after_imports_mb"] > 100  # torch & co. are imported before the baseline is read
        assert len(arm["losses"]) == 2 and all(loss > 0 for loss in arm["losses"])
        assert arm["train_peak_mb"] >= arm["loaded_mb"] > 0
    assert (tmp_path / "work" / "model" / "config.json").is_file()  # --keep keeps the built model


def test_bad_arms_are_refused_with_the_reason(tmp_path):
    proc = _run("--arms", "qlora,fp8", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "qlora_bf16" in proc.stderr and "fp8" in proc.stderr
    proc = _run("--arms", "qlora", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "including qlora and lora16" in proc.stderr
