"""`make bench`: every CPU benchmark in its own subprocess, then one table of the headline figures and goals.

    python benchmarks/run_all.py                      # quick sizes (goal: 15 minutes on 2 idle cores)
    python benchmarks/run_all.py --peers              # make bench-peers: trl's defaults and the peer frameworks
    python benchmarks/run_all.py --full               # each benchmark's own default size (much longer)
    python benchmarks/run_all.py --only memory,train_throughput --out bench.json

Benchmarks: preprocess.py (data stage, cold vs warm cache), generate.py (generation; skipped when the file is
absent), generate_engines.py (batched generation vs llama.cpp on the exported GGUF), train_throughput.py (the
project vs trl's best settings on SmolLM2; train_throughput_qwen runs the same script on the Qwen2.5-0.5B shape),
memory.py (QLoRA vs 16-bit LoRA vs stock peft+trl, on SmolLM2's shape). `--peers` (make bench-peers) runs
train_throughput_peers instead: every arm on SmolLM2 in one run, trl's defaults and the peer frameworks included
(17 minutes alone on its own, 2026-12-02, which is why make bench leaves it out). Each prints one JSON
object as its last stdout line; a benchmark that fails or times out gets a FAILED row and the others still run.
A missed goal is a finding, not a failure: the exit status is 1 only when a benchmark did not produce its JSON.
The last line printed is one JSON object: {benchmark: its JSON, ..., "seconds": {benchmark: wall seconds}}.
Benchmarks must run alone (two trainings sharing 2 cores each ran 8-19x slower): before starting, the other
processes' CPU use is sampled, and a busy machine is refused (exit 3) unless --force, which runs anyway under a
loud warning and records `"busy"` in the JSON. The first lines say the date, the CPU model, its bf16 features and
the compute dtype `quant.compute_dtype=auto` picks on it.
GPU figures come from benchmarks/gpu.py on a GPU machine; it is not run here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
BUSY_EXIT = 3


@dataclass
class Bench:
    name: str
    quick: list[str]  # arguments in the default (make bench) run; sized to fit the 15-minute budget
    goals: list[tuple[str, str, float]] = field(default_factory=list)  # (JSON key, ">=" or "<=", bound)
    shown: list[str] = field(default_factory=list)  # extra JSON keys worth a row
    timeout_s: int = 420
    script: str = ""  # benchmarks/<script>.py; the name when empty (two entries may run one script)
    in_full: bool = True  # False: a quick-only entry whose figures --full's run of the script already covers
    group: str = "bench"  # "peers": run by --peers (make bench-peers) instead of make bench

    @property
    def path(self) -> Path:
        return HERE / f"{self.script or self.name}.py"


# Quick arguments: wall seconds measured on the shared 2-core development machine with OMP_NUM_THREADS=1
# (issue 7 report): preprocess 15 s at its default 20,000 rows, generate about 60 s at its defaults,
# train_throughput --quick 140 s, memory --quick 130 s. Timeouts are a hard stop at 2-3x those.
BENCHES = [
    Bench("preprocess", [], [("warm_speedup", ">=", 20)], ["cold_rows_per_s", "warm_rows_per_s"], timeout_s=120),
    Bench("generate", [],
          [("merged_vs_adapter", ">=", 1.5), ("batched_vs_one_by_one", ">=", 5), ("constrained_slowdown", "<=", 0.25)],
          ["merged_fp32_tokens_per_s"], timeout_s=240),
    # SmolLM2's own folder: the project's batched greedy decoding against llama.cpp single-stream on its GGUF;
    # batch 1 on 8 of the 24 prompts (it took 60.7 of this benchmark's 123 s on all 24, 2026-12-02)
    Bench("generate_engines", ["--rows", "24", "--new-tokens", "48", "--b1-rows", "8"],
          [("batched_vs_llamacpp_best", ">=", 2)],
          ["project_batched_tokens_per_s", "project_b1_tokens_per_s", "llamacpp_best_tokens_per_s",
           "llamacpp_f16_same_outputs"], timeout_s=420),
    # SmolLM2 (the real model): the project against trl's best settings, the headline ratio. trl's defaults and
    # the peer frameworks run in train_throughput_peers (make bench-peers): alone on 2 cores of an Intel Xeon
    # (AVX512-BF16, fp32 compute), 2026-12-02, the six arms at 32 rows took 17 min, of it trl_default 345 s
    # (bf16 autocast, half fp32's speed on that CPU), LLaMA-Factory about 160 s, axolotl 130 s, litgpt 80 s.
    Bench("train_throughput", ["--quick", "--rows", "32", "--arms", "trl_best,project", "--peers", "none"],
          [("ratio_vs_trl_best", ">=", 1.5), ("val_loss_rel_diff_vs_trl_best", "<=", 0.01)],
          ["project_label_tokens_per_s", "trl_best_label_tokens_per_s", "project_val_loss", "trl_best_val_loss",
           "project_peak_rss_mb", "trl_best_peak_rss_mb", "project_mfu", "trl_best_mfu", "matmul_peak_gflops"],
          timeout_s=600),
    # The Qwen2.5-0.5B shape (random weights, 151,936-word vocabulary), project against trl's best only: one
    # 2,048-token step of this shape is about 4 TFLOP, some 40 s here. --full runs it inside train_throughput.
    # One step of this shape is noisy (the project arm measured 49.8, 39.7 and 63.8 s in three runs on
    # 2026-12-02; 1.38x trl's best with one repeat, 2.11x with two); make bench runs one repeat to fit its 15
    # minutes (`--full` runs two).
    Bench("train_throughput_qwen", ["--models", "qwen2.5-0.5b", "--rows", "12", "--repeats", "1",
                                    "--arms", "trl_best,project", "--peers", "none"],
          [("ratio_vs_trl_best", ">=", 1.5), ("val_loss_rel_diff_vs_trl_best", "<=", 0.01)],
          ["project_label_tokens_per_s", "trl_best_label_tokens_per_s", "project_mfu", "trl_best_mfu"],
          timeout_s=600, script="train_throughput", in_full=False),
    # SmolLM2-135M's shape in quick mode (--full: the Qwen2.5-0.5B shape, whose bf16 arms took 128-169 s a step
    # at 2,048 tokens on a CPU where bf16 runs at half fp32's speed)
    Bench("memory", ["--quick"], [("ratio", "<=", 0.5)],
          ["seq_len", "ratio_max", "project_vs_stock", "ratio_auto_compute", "qlora_bf16_peak_mb", "lora16_peak_mb",
           "stock_qlora_peak_mb", "qlora_load_peak_anon_mb", "bf16_copy_mb", "qlora_load_below_bf16_copy"],
          timeout_s=900),
    # make bench-peers: every arm on SmolLM2 in one run (trl's defaults, trl's best, the project and the peers
    # `make peers` installed), so each ratio comes from one process tree
    Bench("train_throughput_peers", ["--quick", "--rows", "32"],
          [("ratio_vs_trl_best", ">=", 1.5), ("val_loss_rel_diff_vs_trl_best", "<=", 0.01)],
          ["ratio_vs_trl_default", "ratio_vs_llamafactory", "ratio_vs_axolotl", "ratio_vs_litgpt",
           "project_label_tokens_per_s", "trl_best_label_tokens_per_s", "trl_default_label_tokens_per_s",
           "llamafactory_label_tokens_per_s", "axolotl_label_tokens_per_s", "litgpt_label_tokens_per_s",
           "project_peak_rss_mb", "trl_best_peak_rss_mb"],
          timeout_s=1500, script="train_throughput", in_full=False, group="peers"),
]


def run_one(bench: Bench, full: bool) -> tuple[dict | None, float, str]:
    """(its final JSON or None, wall seconds, error text)."""
    cmd = [sys.executable, str(bench.path), *([] if full else bench.quick)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"== {bench.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                              timeout=None if full else bench.timeout_s)
    except subprocess.TimeoutExpired as e:
        return None, time.perf_counter() - started, f"timed out after {e.timeout:.0f} s"
    seconds = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    for line in lines[-12:-1]:  # the benchmark's own summary, above its JSON line
        print(f"   {line}")
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict):
        return None, seconds, f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"
    return result, seconds, ""


def table(results: dict, seconds: dict, errors: dict, benches: list[Bench]) -> str:
    """One row per headline figure: benchmark, figure, value, goal, met, wall seconds."""
    rows = [("benchmark", "figure", "value", "goal", "met", "wall s")]
    for b in benches:
        wall = f"{seconds[b.name]:.0f}" if b.name in seconds else ""
        if b.name in errors:
            rows.append((b.name, "FAILED", errors[b.name].splitlines()[0][:60], "", "", wall))
            continue
        r = results[b.name]
        for key, op, bound in b.goals:
            value = r.get(key)
            met = "" if value is None else ("yes" if (value >= bound if op == ">=" else value <= bound) else "NO")
            rows.append((b.name, key, _fmt(value), f"{op} {bound:g}", met, wall))
            wall = ""
        for key in b.shown:
            rows.append((b.name, key, _fmt(r.get(key)), "", "", wall))
            wall = ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def describe_machine() -> dict:
    """Date, CPU model and bf16 features, physical cores and what compute_dtype=auto picks (for the table's head)."""
    from finetune.models.cpu import cpu_dtype_choice, detect_features
    from finetune.train.threads import physical_cores

    f = detect_features()
    return {"date": time.strftime("%Y-%m-%d"), "cpu": f.model, "capability": f.capability,
            "bf16_flags": ",".join(f.bf16_flags), "physical_cores": physical_cores(),
            "auto_dtype": cpu_dtype_choice().dtype, "auto_dtype_reason": cpu_dtype_choice().reason}


def machine_busy() -> str | None:
    """Why the machine is too busy to benchmark on, or None when it is quiet enough (1 s sample)."""
    from finetune.train.threads import sample_load

    sample = sample_load(1.0)
    return sample.message() if sample.busy else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="each benchmark's default size instead of the quick one")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(b.name for b in BENCHES)}")
    p.add_argument("--out", type=Path, default=None, help="also write the combined JSON here")
    p.add_argument("--force", action="store_true", help="run even when other processes are using the CPU")
    p.add_argument("--peers", action="store_true",
                   help="make bench-peers: SmolLM2 against trl's defaults and the peer frameworks (all arms in one "
                        "run) instead of make bench's set")
    args = p.parse_args(argv)
    if args.peers and args.full:
        p.error("--full already runs trl's defaults and the peers (train_throughput's default arms); drop --peers")
    names = [b.name for b in BENCHES]
    wanted = names if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in names]
    if unknown or not wanted:
        p.error(f"--only {args.only!r}: choose from {', '.join(names)}")
    benches = [b for b in BENCHES if b.name in wanted]
    if args.only is None:
        benches = [b for b in benches if (b.group == "peers") == args.peers]
    if args.full:
        benches = [b for b in benches if b.in_full]
    missing = [b.name for b in benches if not b.path.is_file()]
    for b in benches:
        if b.name in missing:
            print(f"== {b.name}: skipped, benchmarks/{b.path.name} is not in this checkout", flush=True)
    benches = [b for b in benches if b.name not in missing]
    machine = describe_machine()
    print(f"== {machine['date']}: {machine['cpu']}; torch capability {machine['capability']}, bf16 flags "
          f"{machine['bf16_flags'] or 'none'}; {machine['physical_cores']} physical cores; compute dtype auto -> "
          f"{machine['auto_dtype']}", flush=True)
    busy = machine_busy()
    if busy is not None and not args.force:
        print(f"REFUSED: {busy}\nStop the other jobs, or run with --force to measure anyway.", file=sys.stderr)
        return BUSY_EXIT
    if busy is not None:
        print(f"{'!' * 100}\nWARNING (--force): {busy}\n{'!' * 100}", flush=True)

    results, seconds, errors = {}, {}, {}
    started = time.perf_counter()
    for b in benches:
        result, seconds[b.name], error = run_one(b, args.full)
        if result is None:
            errors[b.name] = error
            print(f"   FAILED: {error}", flush=True)
        else:
            results[b.name] = result
    total = time.perf_counter() - started
    print(f"\n{table(results, seconds, errors, benches)}\n\n"
          f"total {total:.0f} s ({'full' if args.full else 'quick'} sizes, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    combined = {**results, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_s": round(total, 1),
                "failed": sorted(errors), "skipped": missing, "machine": machine, "busy": busy}
    if args.out:
        args.out.write_text(json.dumps(combined, indent=2) + "\n")
    print(json.dumps(combined))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
