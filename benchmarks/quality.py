"""QLoRA (nf4 base) against 16-bit LoRA on the real model: held-out quality after the same training.

The QLoRA paper's claim is that training an adapter against a 4-bit NormalFloat base matches 16-bit LoRA.
This runs the real demo (`finetune train experiment=demo`: SmolLM2-135M-Instruct, the bundled extraction
data) twice through the project's own command, once with `quant=nf4` (the default) and once with
`quant=none`, same rows, steps, seed and decoding, and prints base / nf4 / 16-bit held-out metrics and their
differences. It then merges the nf4 adapter onto the *original* 16-bit weights as well (the shipped merge uses
the nf4 round trip the adapter was trained against) and scores that too, to show what the merge base does.

    python benchmarks/quality.py                 # about 3 x the demo's time, on 2 idle cores
    python benchmarks/quality.py --set train.max_steps=10 --set eval.max_samples=8   # a quick look
    python benchmarks/quality.py --nf4-run outputs/demo/<time>   # reuse a `make demo` run as the nf4 arm

Goal (issue 13): nf4 within 2 points of exact match and 0.02 of field F1 of 16-bit.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("exact_match", "json_valid_rate", "schema_valid_rate", "field_f1", "stopped_rate", "chrf")


def finetune(*args: str) -> float:
    """Run one `finetune` command in its own process (as a user would); returns its wall seconds."""
    cmd = [sys.executable, "-m", "finetune", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if done.returncode not in (0, 2):  # 2 = a quality gate missed: the report is still written
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def report(run: Path) -> dict:
    return json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))


def pick(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in METRICS if k in metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for both arms (e.g. train.max_steps=10)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    ap.add_argument("--nf4-run", type=Path, default=None,
                    help="an existing `make demo` run directory to use as the nf4 arm (saves one training; its "
                         "eval/ is rewritten by the merge-base check)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    common = ["experiment=demo", *args.set]
    runs = {"nf4": args.nf4_run or work / "nf4", "bf16": work / "bf16"}
    seconds = {}
    if args.nf4_run is None:
        seconds["nf4"] = finetune("train", *common, "quant=nf4", f"hydra.run.dir={runs['nf4']}")
    else:  # the run's own config must be the demo's: its summary is what the nf4 arm reports
        records = [json.loads(x) for x in (args.nf4_run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        seconds["nf4"] = next((r["train_runtime"] for r in records if "train_runtime" in r), float("nan"))
    seconds["bf16"] = finetune("train", *common, "quant=none", "eval.compare_base=false",  # the base is scored once
                              f"hydra.run.dir={runs['bf16']}")
    nf4, bf16 = report(runs["nf4"]), report(runs["bf16"])
    # The nf4 adapter merged onto the original weights instead of the nf4 round trip it was trained against.
    shutil.copytree(runs["nf4"] / "eval", work / "nf4-eval-roundtrip")
    orig = runs["nf4"] / "merged-original"
    finetune("merge", f"run={runs['nf4']}", "merge.base=original", f"merge.output={orig}", "merge.overwrite=true")
    finetune("eval", f"run={runs['nf4']}", f"merge.output={orig}", "eval.compare_base=false")
    on_original = report(runs["nf4"])

    rows = {"base": pick(nf4["base"]), "nf4 (QLoRA)": pick(nf4["metrics"]), "16-bit LoRA": pick(bf16["metrics"]),
            "nf4 merged onto original": pick(on_original["metrics"])}
    print(f"settings: {nf4['settings']}  (overrides: {' '.join(common)})")
    print(f"{'model':26s}" + "".join(f"{m:>19s}" for m in METRICS))
    for name, m in rows.items():
        print(f"{name:26s}" + "".join(f"{m.get(k, float('nan')):19.4f}" for k in METRICS))
    diff = {k: round(rows["nf4 (QLoRA)"][k] - rows["16-bit LoRA"][k], 4) for k in METRICS
            if k in rows["nf4 (QLoRA)"] and k in rows["16-bit LoRA"]}
    merge_effect = {k: round(rows["nf4 merged onto original"][k] - rows["nf4 (QLoRA)"][k], 4) for k in METRICS
                    if k in rows["nf4 merged onto original"] and k in rows["nf4 (QLoRA)"]}
    print(f"nf4 - 16-bit: {diff}")
    print(f"merge onto original - merge onto nf4 round trip (nf4 adapter): {merge_effect}")
    goal = abs(diff.get("exact_match", 1)) <= 0.02 and abs(diff.get("field_f1", 1)) <= 0.02
    if args.keep:
        print(f"runs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "quality", **{f"{n}": m for n, m in rows.items()}, "nf4_minus_16bit": diff,
                      "merge_original_minus_roundtrip": merge_effect, "goal_met": goal,
                      "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "cpu_threads": os.cpu_count()}))


if __name__ == "__main__":
    main()
