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


def test_tiny_smoke_run_reports_peaks_and_ratios_per_length(tmp_path):
    """Build + three arms at two lengths, each in its own process (the qlora arm, compute dtype auto, is the
    project's loader again: finetune/models/cpu.py's tests cover what auto picks)."""
    proc = _run("--size", "tiny", "--arms", "qlora_bf16,lora16,stock_qlora", "--steps", "1",
                "--seq-lens", "16,64", "--keep", str(tmp_path / "work"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["by_seq_len"]) == {"16", "64"} and out["seq_len"] == 64  # headline: the longest length
    assert out["by_seq_len"]["64"]["ratio"] == out["ratio"] and out["ratio_max"] >= out["ratio"] > 0
    assert {"project_vs_stock", "stock_qlora_peak_mb"} <= set(out) and "ratio_auto_compute" not in out
    assert set(out["goals_met"]) == {"ratio<=0.5"}
    details = {(d["arm"], d["seq_len"]): d for d in out["details"]}
    assert set(details) == {(a, n) for a in ("qlora_bf16", "lora16", "stock_qlora") for n in (16, 64)}
    for n in (16, 64):
        arms = {a: details[(a, n)] for a in ("qlora_bf16", "lora16", "stock_qlora")}
        # the headline ratio compares arms with the same compute dtype: only the storage differs
        assert arms["qlora_bf16"]["compute_dtype"] == arms["lora16"]["compute_dtype"] == "bfloat16"
        assert arms["qlora_bf16"]["quant"] == "nf4" and arms["lora16"]["quant"] == "none"
        # stock peft widens the frozen table to fp32; the project's loader keeps the checkpoint's bf16
        assert arms["stock_qlora"]["embedding_dtype"] == "float32"
        assert arms["qlora_bf16"]["embedding_dtype"] == arms["lora16"]["embedding_dtype"] == "bfloat16"
        for arm in arms.values():
            assert arm["after_imports_mb"] > 100  # torch & co. are imported before the baseline is read
            assert len(arm["losses"]) == 1 and all(loss > 0 for loss in arm["losses"])
            assert arm["train_peak_mb"] >= arm["loaded_mb"] >= 0
            # the first length of an arm loads in a fresh process; a later one may reuse heap pages the one
            # before freed (the 2-layer model is under 1 MB), so only the first must show its weights
            if n == 16:
                assert arm["loaded_mb"] > 0
    assert (tmp_path / "work" / "model" / "config.json").is_file()  # --keep keeps the built model


def test_bad_arms_are_refused_with_the_reason(tmp_path):
    proc = _run("--arms", "qlora,fp8", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "qlora_bf16" in proc.stderr and "fp8" in proc.stderr
    proc = _run("--arms", "qlora,lora16", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "including qlora_bf16 and lora16" in proc.stderr
    proc = _run("--seq-lens", "64,x", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr


def test_where_auto_picks_bf16_the_qlora_figures_are_the_qlora_bf16_arm():
    """The qlora arm (compute_dtype auto) is skipped where auto resolves to bf16; its figures are qlora_bf16's."""
    from tests.support import load_script

    memory = load_script(SCRIPT, "bench_memory")
    arm = lambda peak, dtype: {"load_peak_anon_mb": 10, "loaded_mb": 20, "train_peak_mb": peak,  # noqa: E731
                               "compute_dtype": dtype}
    arms = {"qlora_bf16": arm(300, "bfloat16"), "lora16": arm(600, "bfloat16")}
    out = memory.ratios(arms, copy16=50.0, auto_is_bf16=True)
    assert out["ratio"] == out["ratio_auto_compute"] == 0.5 and out["qlora_peak_mb"] == 300
    assert out["qlora_compute_dtype"] == "bfloat16" and out["qlora_load_below_bf16_copy"] is True
    assert "ratio_auto_compute" not in memory.ratios(arms, copy16=50.0)  # fp32 auto: the arm must run


def test_on_a_cpu_without_native_bf16_quick_caps_the_bf16_arms_and_says_so(monkeypatch, capsys):
    """Emulated bf16 made one 512-token bf16 step take 109 s on an AVX2 EPYC: --quick there runs the bf16 arms up
    to 512 tokens and warns; a CPU with native bf16, an explicit --bf16-max-len or a full run are not capped."""
    from finetune.models import cpu
    from tests.support import load_script

    memory = load_script(SCRIPT, "bench_memory")
    avx2 = cpu.CpuFeatures("AMD EPYC", "AVX2", ())
    monkeypatch.setattr(cpu, "detect_features", lambda: avx2)
    assert memory.bf16_length_cap(memory.parse_args(["--quick"])) == 512
    assert "no native bf16" in capsys.readouterr().out
    assert memory.bf16_length_cap(memory.parse_args(["--quick", "--bf16-max-len", "4096"])) == 4096
    assert memory.bf16_length_cap(memory.parse_args([])) is None
    monkeypatch.setattr(cpu, "detect_features", lambda: cpu.CpuFeatures("Xeon", "AVX512", ("avx512_bf16",)))
    assert memory.bf16_length_cap(memory.parse_args(["--quick"])) is None


def test_a_length_the_bf16_arms_skipped_reports_the_qlora_arm_and_the_headline_is_the_longest_compared(capsys):
    from tests.support import load_script

    memory = load_script(SCRIPT, "bench_memory")
    arm = lambda name, peak, dtype: {"arm": name, "load_peak_anon_mb": 10, "loaded_mb": 20,  # noqa: E731
                                     "train_peak_mb": peak, "compute_dtype": dtype, "load_peak_mb": 30,
                                     "train_peak_anon_mb": peak, "load_s": 1.0, "step_s": 1.0}
    by_len = {512: {"qlora": arm("qlora", 500, "float32"), "qlora_bf16": arm("qlora_bf16", 300, "bfloat16"),
                    "lora16": arm("lora16", 400, "bfloat16")},
              2048: {"qlora": arm("qlora", 2000, "float32")}}
    args = memory.parse_args(["--quick"])
    args.skipped = {"2048": ["qlora_bf16", "lora16"]}
    out = memory.report(by_len, 50.0, args)
    assert out["seq_len"] == 512 and out["ratio"] == 0.75 and out["ratio_max"] == 0.75
    assert out["by_seq_len"]["2048"] == {"qlora_peak_mb": 2000, "qlora_compute_dtype": "float32",
                                         "qlora_load_peak_anon_mb": 10, "qlora_load_below_bf16_copy": True}
    assert out["skipped"] == {"2048": ["qlora_bf16", "lora16"]}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seq_len"] == 512
