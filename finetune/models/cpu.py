"""The compute dtype a CPU trains fastest in (`quant.compute_dtype=auto` on CPU): bf16 or fp32.

CPUs differ too much to assume either way. On an AVX2-only CPU bf16 is emulated and a 4-bit step ran 2.75x slower
(198 ms bf16 vs 72 ms fp32); on an AMD EPYC with AVX512-BF16 bf16 training ran 1.27x faster; on an Intel Xeon
with AMX-BF16 a 2048x2048 matmul ran 5.7x faster (286 vs 50 GFLOP/s) and a LoRA step of SmolLM2-135M 1.67x
(docs: STACK.md). So the choice is made from the CPU's bf16 instructions *and* a short measurement: a bf16 and an
fp32 matmul of one micro-batch slice, a few ms, once per machine (cached per process and under
`<cache>/cpu/`, keyed by CPU model and torch version). `FINETUNE_CPU_DTYPE=float32|bfloat16` overrides both.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import write_json_atomic
from finetune.paths import cache_root

log = logging.getLogger("finetune.models.cpu")

ENV = "FINETUNE_CPU_DTYPE"
# /proc/cpuinfo flags of native bf16 arithmetic: x86 AMX tiles and AVX512 dot products; `bf16` is the
# aarch64 feature (Graviton3, Neoverse V1/V2).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 must win the matmul by this much. On the AVX512-BF16 EPYC above the matmul ran 2x faster in bf16 but a
# whole training step only 1.27x: elementwise ops, casts and the optimizer (60% of a bf16 step in one profile)
# gain nothing. Below a 1.5x matmul gain the step would come out about even, and fp32 is exact.
MARGIN = 1.5
# One micro-batch slice: 256 tokens through a 512 -> 1024 projection (0.27 GFLOP): 1-6 ms in fp32 on one core
# of the CPUs above, large enough for oneDNN's bf16 kernels to engage (at 64x64 they do not).
MATMUL_SHAPE = (256, 512, 1024)
REPEATS = 5  # best of 5, interleaved, so a burst of load from another process does not decide


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # "AMD EPYC 9R14", from /proc/cpuinfo
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    bf16_flags: tuple[str, ...]  # the BF16_FLAGS this CPU has

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)


@dataclass(frozen=True)
class MatmulTiming:
    fp32_ms: float
    bf16_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms if self.bf16_ms > 0 else 0.0


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16"
    reason: str  # one line: features, the two figures, the choice

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def _cpuinfo(cpuinfo: str | None) -> str:
    if cpuinfo is not None:
        return cpuinfo
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty where there is none."""
    flags: set[str] = set()
    for line in _cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def detect_features(cpuinfo: str | None = None) -> CpuFeatures:
    """This CPU's model name, torch's vector capability and its native-bf16 flags (`cpuinfo`: the text of
    /proc/cpuinfo, read when not given; empty where there is none, e.g. macOS)."""
    import torch

    cpuinfo = _cpuinfo(cpuinfo)
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "cpu model"):
            model = value.strip()
            break
    flags = cpu_flags(cpuinfo)
    return CpuFeatures(model=model or platform.processor() or platform.machine(),
                       capability=torch.backends.cpu.get_cpu_capability(),
                       bf16_flags=tuple(f for f in BF16_FLAGS if f in flags))


def measure_matmul(shape: tuple[int, int, int] = MATMUL_SHAPE, repeats: int = REPEATS) -> MatmulTiming:
    """Best-of-`repeats` milliseconds of one (m x k) @ (k x n) matmul in fp32 and in bf16, on one thread (the
    ratio is the CPU's; one thread keeps it from depending on how busy the other cores are)."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a32 @ b32, a16 @ b16  # first calls pick and prepare kernels
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(repeats):
            for name, (a, b) in (("fp32", (a32, b32)), ("bf16", (a16, b16))):
                started = time.perf_counter()
                a @ b
                best[name] = min(best[name], (time.perf_counter() - started) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return MatmulTiming(fp32_ms=round(best["fp32"], 3), bf16_ms=round(best["bf16"], 3))


# Measured on AVX2-only CPUs: a 4-bit step 2.75x slower in bf16; on an AMD EPYC (AVX2, 2026-12-02) a 512x576 by
# 576x1536 linear 16.8 against 117 GFLOP/s (7x) and a 2048^3 matmul 0.3 against 166 GFLOP/s.
EMULATED = "emulated bf16 ran 2.75-7x slower than fp32 on AVX2 CPUs"


def choose_dtype(features: CpuFeatures, timing: MatmulTiming | None, margin: float = MARGIN) -> DtypeChoice:
    """The decision, pure: bf16 only where the CPU has native bf16 instructions and the measured bf16 matmul
    beat fp32 by `margin`; fp32 otherwise. `timing` may be None for a CPU without bf16 instructions (nothing
    to measure: emulated bf16 ran 2.75x to 7x slower, see EMULATED)."""
    what = f"{features.model or 'unknown CPU'}, torch capability {features.capability}, bf16 flags " \
           f"{','.join(features.bf16_flags) or 'none'}"
    if not features.native_bf16:
        return DtypeChoice("float32", f"{what}: no native bf16 ({EMULATED}) -> float32")
    if timing is None:
        return DtypeChoice("float32", f"{what}: not measured -> float32")
    figures = (f"matmul {'x'.join(map(str, MATMUL_SHAPE))} fp32 {timing.fp32_ms:.2f} ms, bf16 {timing.bf16_ms:.2f} "
               f"ms ({timing.speedup:.2f}x)")
    if timing.speedup >= margin:
        return DtypeChoice("bfloat16", f"{what}; {figures} >= {margin}x -> bfloat16")
    return DtypeChoice("float32", f"{what}; {figures} < {margin}x -> float32")


def _cache_file(features: CpuFeatures) -> Path:
    import torch

    key = json.dumps([features.model, features.capability, features.bf16_flags, torch.__version__, MATMUL_SHAPE])
    return cache_root() / "cpu" / f"matmul-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_timing(features: CpuFeatures) -> MatmulTiming:
    """The matmul timing of this CPU + torch version from the project cache, measured (and stored) on a miss."""
    path = _cache_file(features)
    try:
        return MatmulTiming(**{k: float(v) for k, v in json.loads(path.read_text())["timing"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    timing = measure_matmul()
    try:
        write_json_atomic(path, {"features": asdict(features), "timing": asdict(timing)})
    except OSError as e:  # a read-only cache costs a few ms per process, nothing else
        log.debug("cannot cache the CPU matmul timing at %s: %s", path, e)
    return timing


@lru_cache(maxsize=1)
def cpu_dtype_choice() -> DtypeChoice:
    """What `auto` means on this CPU, decided once per process and logged once (FINETUNE_CPU_DTYPE wins)."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise FinetuneError(f"{ENV}={forced!r}: use float32 or bfloat16 (or unset it to decide by the CPU)")
        choice = DtypeChoice(forced, f"{ENV}={forced} -> {forced}")
    else:
        features = detect_features()
        choice = choose_dtype(features, cached_timing(features) if features.native_bf16 else None)
    log.info("compute dtype auto on CPU: %s", choice.reason)
    return choice


def cpu_compute_dtype():
    """torch dtype for `compute_dtype=auto` on CPU (see `cpu_dtype_choice`)."""
    return cpu_dtype_choice().torch_dtype()
