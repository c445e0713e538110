"""finetune/models/cpu.py: the CPU compute dtype behind quant.compute_dtype=auto, decided from injected features and
timings (pure and fast), its log line, its caches and the FINETUNE_CPU_DTYPE override."""
from __future__ import annotations

import logging

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.models import cpu
from finetune.models.cpu import CpuFeatures, MatmulTiming, choose_dtype, detect_features
from finetune.models.load import resolve_dtype

AVX2 = CpuFeatures("AMD EPYC 7B12", "AVX2", ())
AVX512_BF16 = CpuFeatures("AMD EPYC 9R14", "AVX512", ("avx512_bf16",))
AMX = CpuFeatures("Intel(R) Xeon(R) Platinum 8480+", "AVX512", ("amx_bf16", "avx512_bf16"))


@pytest.fixture
def undecided(monkeypatch, tmp_path):
    """No override, an empty cache, and the per-process decision forgotten before and after."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    cpu.cpu_dtype_choice.cache_clear()
    yield
    cpu.cpu_dtype_choice.cache_clear()


def test_avx2_only_cpu_computes_in_fp32_without_measuring():
    choice = choose_dtype(AVX2, None)
    assert choice.dtype == "float32" and "no native bf16" in choice.reason
    # even a (bogus) timing cannot make emulated bf16 the choice
    assert choose_dtype(AVX2, MatmulTiming(fp32_ms=10.0, bf16_ms=1.0)).dtype == "float32"


def test_bf16_capable_cpu_measured_slower_or_barely_faster_stays_fp32():
    assert choose_dtype(AVX512_BF16, MatmulTiming(fp32_ms=2.0, bf16_ms=3.0)).dtype == "float32"
    below = MatmulTiming(fp32_ms=2.0, bf16_ms=2.0 / (cpu.MARGIN * 0.95))  # faster, but not by the margin
    choice = choose_dtype(AVX512_BF16, below)
    assert choice.dtype == "float32" and f"< {cpu.MARGIN}x -> float32" in choice.reason


def test_bf16_capable_cpu_measured_faster_computes_in_bf16():
    choice = choose_dtype(AMX, MatmulTiming(fp32_ms=5.36, bf16_ms=0.94))  # AMX: 5.7x (STACK.md)
    assert choice.dtype == "bfloat16" and choice.torch_dtype() is torch.bfloat16
    assert choose_dtype(AVX512_BF16, MatmulTiming(fp32_ms=2.0, bf16_ms=2.0 / cpu.MARGIN)).dtype == "bfloat16"
    # the reason names the features, both figures and the choice
    for part in ("Intel(R) Xeon(R) Platinum 8480+", "capability AVX512", "amx_bf16,avx512_bf16", "fp32 5.36 ms",
                 "bf16 0.94 ms", "5.70x", "-> bfloat16"):
        assert part in choice.reason, (part, choice.reason)


def test_features_are_read_from_cpuinfo_on_x86_and_arm():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16\n"
    got = detect_features(x86)
    assert got.model == "AMD EPYC 9R14" and got.bf16_flags == ("amx_bf16", "avx512_bf16") and got.native_bf16
    assert got.capability == torch.backends.cpu.get_cpu_capability()
    assert detect_features("model name : Old\nflags : fpu sse avx2 fma\n").bf16_flags == ()
    assert detect_features("CPU part : 0xd40\nFeatures : fp asimd sve bf16 i8mm\n").bf16_flags == ("bf16",)


def test_the_choice_is_logged_once_with_features_figures_and_choice(undecided, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "detect_features", lambda: AVX512_BF16)
    monkeypatch.setattr(cpu, "measure_matmul", lambda: MatmulTiming(fp32_ms=4.0, bf16_ms=1.6))
    with caplog.at_level(logging.INFO, logger="finetune.models.cpu"):
        assert resolve_dtype("auto", "cpu") is torch.bfloat16
        assert resolve_dtype("auto", "cpu") is torch.bfloat16  # decided once per process
    lines = [r.getMessage() for r in caplog.records if r.name == "finetune.models.cpu"]
    assert lines == ["compute dtype auto on CPU: AMD EPYC 9R14, torch capability AVX512, bf16 flags avx512_bf16; "
                     "matmul 256x512x1024 fp32 4.00 ms, bf16 1.60 ms (2.50x) >= 1.5x -> bfloat16"]
    assert resolve_dtype("auto", "cuda") is torch.bfloat16 and resolve_dtype("float32", "cpu") is torch.float32


def test_the_measurement_is_cached_per_cpu_model_and_torch_version(undecided, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cpu, "measure_matmul", lambda: calls.append(1) or MatmulTiming(fp32_ms=3.0, bf16_ms=1.0))
    assert cpu.cached_timing(AVX512_BF16) == MatmulTiming(3.0, 1.0)
    assert cpu.cached_timing(AVX512_BF16) == MatmulTiming(3.0, 1.0) and len(calls) == 1  # read back from disk
    assert list((tmp_path / "cpu").glob("matmul-*.json"))
    cpu.cached_timing(AMX)  # another CPU model: its own entry
    assert len(calls) == 2
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: its own entry
    cpu.cached_timing(AVX512_BF16)
    assert len(calls) == 3


def test_environment_override_wins_and_is_checked(undecided, monkeypatch):
    monkeypatch.setattr(cpu, "measure_matmul", lambda: pytest.fail("an override must not measure"))
    monkeypatch.setattr(cpu, "detect_features", lambda: AMX)
    monkeypatch.setenv(cpu.ENV, "float32")
    assert resolve_dtype("auto", "cpu") is torch.float32
    cpu.cpu_dtype_choice.cache_clear()
    monkeypatch.setenv(cpu.ENV, "bfloat16")
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    cpu.cpu_dtype_choice.cache_clear()
    monkeypatch.setenv(cpu.ENV, "fp16")
    with pytest.raises(FinetuneError, match="FINETUNE_CPU_DTYPE='fp16': use float32 or bfloat16"):
        resolve_dtype("auto", "cpu")


def test_real_measurement_is_short_and_leaves_the_thread_count_alone():
    before = torch.get_num_threads()
    timing = cpu.measure_matmul((64, 128, 128), repeats=2)
    assert timing.fp32_ms > 0 and timing.bf16_ms > 0
    assert torch.get_num_threads() == before
