"""Preprocessing throughput: rows/s of build_datasets on a generated multi-turn dataset, cold (1 core and
all cores) and warm cache.

    python benchmarks/preprocess.py [--rows 20000]

Cold = empty cache (read, convert, render with the chat template, tokenize, mask, save), once with
data.num_proc=1 and once with every core; warm = the same config again (hash the inputs, memory-map the
cached arrow files). Goal: warm >= 20x faster than cold. The last line printed is one JSON object with
every figure. Not a timed test; run it alone (two benchmarks at once on 2 cores measure each other).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from finetune.data import build_datasets  # noqa: E402
from finetune.config.data import DataConfig, SourceConfig  # noqa: E402
from finetune.data.parallel import MIN_ROWS_FOR_POOL, available_cores  # noqa: E402

WORDS = "the a cat dog sky tree house blue green red small big runs eats sees likes today".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """n conversations of 1-3 exchanges, a third with a system message."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": _sentence(rng)}, {"role": "assistant", "content": _sentence(rng)}]
        rows.append({"messages": msgs})
    return rows


def timed_build(cfg: DataConfig, tokenizer, cache_dir: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    splits = build_datasets(cfg, tokenizer, cache_dir=cache_dir)
    return time.perf_counter() - t0, len(splits.train) + len(splits.val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()

    from finetune.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)), encoding="utf-8")
        cores = available_cores()

        def cfg(num_proc):
            return DataConfig(sources=[SourceConfig(path=str(data), format="messages")], val_fraction=0.05,
                              max_length=512, num_proc=num_proc)

        one_s, n_one = timed_build(cfg(1), tokenizer, Path(tmp) / "cache1")
        cold_s, n = timed_build(cfg(None), tokenizer, Path(tmp) / "cache")
        warm_s, n_warm = timed_build(cfg(None), tokenizer, Path(tmp) / "cache")
        assert n_one == n == n_warm == args.rows, (n_one, n, n_warm)
    result = {"rows": args.rows, "cores": cores, "cold_1_core_rows_per_s": round(n_one / one_s, 1),
              "cold_all_cores_rows_per_s": round(n / cold_s, 1),
              "cold_rows_per_s": round(n / cold_s, 1), "warm_rows_per_s": round(n / warm_s, 1),
              "cold_1_core_s": round(one_s, 3), "cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3),
              "cores_speedup": round(one_s / cold_s, 2), "warm_speedup": round(cold_s / warm_s, 1)}
    if args.rows < MIN_ROWS_FOR_POOL:
        result["note"] = f"under {MIN_ROWS_FOR_POOL} rows the pool is not used: both cold runs are one core"
    print(f"cold 1 core {one_s:.2f} s, cold {cores} cores {cold_s:.2f} s, warm {warm_s:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
