"""benchmarks/gpu.py runs end to end on CPU (tiny shape) and writes every figure the GPU run reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu", "--out", str(out), *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the JSON is also the last stdout line
    return result, proc.stdout


def _check(result: dict, seq_lens: list[int]) -> None:
    sections = result["sections"]
    expected = ["setup", *(f"train_{t}" for t in seq_lens), "decode", "fsdp_smoke"]
    assert {n: sections[n]["status"] for n in expected} == dict.fromkeys(expected, "ok"), sections
    assert sections["setup"]["params"] > 0 and sections["setup"]["lora_params"] > 0
    for t in seq_lens:
        train = sections[f"train_{t}"]
        assert train["tokens_per_step"] == t
        for key in ("tokens_per_s", "label_tokens_per_s", "step_s", "peak_mem_gib", "mfu", "loss", "planned_peak_gib"):
            assert train[key] > 0, (t, key, train[key])
        assert train["label_tokens_per_s"] < train["tokens_per_s"]  # sequence starts are not labels
        assert result["summary"][f"label_tokens_per_s@{t}"] == train["label_tokens_per_s"]
    for batch in ("batch_1", "batch_16"):
        assert sections["decode"][batch]["tokens_per_s"] > 0
    assert sections["fsdp_smoke"]["ok"] is True and sections["fsdp_smoke"]["loss"] > 0
    assert result["targets"] == {"label_tokens_per_s": 30_000, "peak_mem_gib": 8.0, "decode_tokens_per_s_b1": 150}
    assert "decode_tokens_per_s@b1 >= 150" in result["checks"] and result["total_s"] > 0


def test_tiny_cpu_run_nf4(tmp_path):
    """The GPU run's own path (bitsandbytes nf4 + LoRA), shrunk: about 20 s here."""
    result, stdout = _run(tmp_path, "--seq-lens", "64,128")
    _check(result, [64, 128])
    assert result["sections"]["setup"]["quant"] == "nf4"
    assert "target >= 30,000" in stdout and "target <= 8 GiB" in stdout and "target >= 150" in stdout


@pytest.mark.slow  # the same on an unquantized base: another 15-40 s, depending on the machine's load
def test_tiny_cpu_run_unquantized(tmp_path):
    result, _ = _run(tmp_path, "--quant", "none", "--seq-lens", "64,128")
    _check(result, [64, 128])
    assert result["sections"]["setup"]["quant"] == "none"


def test_a_failed_section_is_recorded_and_the_others_still_run(tmp_path):
    result, _ = _run(tmp_path, "--quant", "none", "--attn", "no_such_attention", "--fsdp-smoke", "on")
    sections = result["sections"]
    assert sections["setup"]["status"] == "skipped" and "no_such_attention" in sections["setup"]["reason"]
    assert sections["train_128"] == {"status": "skipped", "reason": "needs ['setup']"}
    assert sections["fsdp_smoke"]["status"] == "ok" and sections["fsdp_smoke"]["ok"] is True
