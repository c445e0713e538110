"""benchmarks/train_throughput.py: the rows it generates, what each arm is configured to do (and really does), the
override switches, and a smoke run of every arm on the embedded tiny model."""
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
    rows = tt.make_rows(2000, per_word, max_tokens=tt.MAX_LENGTH)
    words = [sum(len(m["content"].split()) for m in r["messages"]) for r in rows]
    tokens = [w * per_word + 12 for w in words]  # the inverse of make_rows' conversion
    assert abs(statistics.median(tokens) - tt.MEDIAN_TOKENS) < 15
    assert max(tokens) <= tt.MAX_LENGTH == 2048
    logs = [math.log(t) for t in tokens if t > 40]
    assert 0.5 < statistics.stdev(logs) < 0.65  # the redrawn low tail narrows it a little
    reply_share = statistics.mean(len(r["messages"][1]["content"].split()) / w for r, w in zip(rows, words))
    assert abs(reply_share - tt.REPLY_SHARE) < 0.03
    assert tt.make_rows(50, per_word, 512) == tt.make_rows(50, per_word, 512)  # seeded


def test_bad_arguments_are_refused_with_the_reason():
    for args, reason in ((["--rows", "3"], "--rows must be >= 10"), (["--project-set", "train.packing"], "KEY=VALUE"),
                         (["--models", "gpt5"], "choose from smollm2"), (["--peers", "unsloth"], "llamafactory")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 2 and reason in proc.stderr, (args, proc.stderr)


def test_trl_arms_are_trl_defaults_and_trl_best_and_overrides_win(tmp_path):
    """The arms' SFTConfig fields; --baseline-set replaces any of them (per_device_train_batch_size used to raise a
    duplicate-keyword error)."""
    from trl import SFTConfig

    tt = _module()
    settings = {"model": "tiny", "rows": 20, "max_length": 2048, "project_set": [], "baseline_set": []}
    cfg = _prepared(tt, tmp_path, settings)[1]
    data = {"trl_default_accumulation": 5, "auto_dtype": "bfloat16"}
    default = SFTConfig(output_dir=str(tmp_path / "a"), **tt.trl_arm_fields("trl_default", cfg, data, []))
    assert not default.packing and not default.padding_free and default.bf16 and default.gradient_checkpointing
    assert (default.per_device_train_batch_size, default.gradient_accumulation_steps) == (8, 5)
    best = SFTConfig(output_dir=str(tmp_path / "b"), **tt.trl_arm_fields("trl_best", cfg, data, []))
    assert best.packing and best.padding_free and not best.gradient_checkpointing and best.bf16  # the auto dtype
    t = cfg.train  # the project's micro-batch and accumulation: the same tokens per optimizer step
    assert (best.per_device_train_batch_size, best.gradient_accumulation_steps, best.max_length) == (
        t.per_device_train_batch_size, t.gradient_accumulation_steps, 2048)
    assert best.learning_rate == default.learning_rate == t.learning_rate and best.seed == t.seed
    fp32 = SFTConfig(output_dir=str(tmp_path / "c"),
                     **tt.trl_arm_fields("trl_best", cfg, {**data, "auto_dtype": "float32"}, []))
    assert not fp32.bf16
    overridden = tt.trl_arm_fields("trl_default", cfg, data, ["per_device_train_batch_size=2",
                                                              "gradient_checkpointing=false"])
    args = SFTConfig(output_dir=str(tmp_path / "d"), **overridden)
    assert args.per_device_train_batch_size == 2 and not args.gradient_checkpointing


def test_gradient_checkpointing_override_reaches_the_baseline_model(tmp_path):
    """peft's k-bit recipe turns checkpointing on by itself; the baseline follows its SFTConfig instead."""
    tt = _module()
    settings = {"model": "tiny", "rows": 20, "max_length": 2048, "project_set": [], "baseline_set": []}
    work, _, data = _prepared(tt, tmp_path, settings)

    def checkpointed(trainer) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())

    assert checkpointed(tt.trl_trainer("trl_default", work, settings, data))  # trl's default: on
    off = {**settings, "baseline_set": ["gradient_checkpointing=false"]}
    assert not checkpointed(tt.trl_trainer("trl_default", work, off, data))
    assert not checkpointed(tt.trl_trainer("trl_best", work, settings, data))


def _prepared(tt, tmp_path: Path, settings: dict):
    work = tmp_path / "work"
    if not (work / "data.json").is_file():
        work.mkdir()
        data = tt.prepare(work, settings)
        (work / "data.json").write_text(json.dumps(data))
    return work, tt.project_config(work, settings), json.loads((work / "data.json").read_text())


def test_summary_has_one_ratio_per_arm_that_ran_and_the_reasons_for_the_rest(capsys):
    tt = _module()
    data = {"train_rows": 9, "val_rows": 1, "tokens": 900, "max": 300, "label_tokens": 400, "p10": 50, "p50": 90,
            "p90": 200, "tokens_per_step": 8192, "threads": 1, "auto_dtype": "float32"}
    runs = [{"arm": "project", "train_s": 2.0, "steps": 1, "computed_tokens": 900, "label_tokens_per_s": 200.0,
             "peak_rss_mb": 800.0, "val_loss": 5.0},
            {"arm": "trl_best", "train_s": 3.0, "steps": 1, "computed_tokens": 900, "label_tokens_per_s": 133.3,
             "peak_rss_mb": 900.0, "val_loss": 5.1},
            {"arm": "project", "train_s": 1.0, "steps": 1, "computed_tokens": 900, "label_tokens_per_s": 400.0,
             "peak_rss_mb": 800.0},  # the second repeat: faster, not evaluated
            {"arm": "llamafactory", "error": "llamafactory-cli failed (exit 1): ValueError: no CPU"},
            {"arm": "litgpt", "train_s": 2.5, "steps": 2, "computed_tokens": None, "label_tokens_per_s": 160.0,
             "peak_rss_mb": 700.0, "val_loss": 5.2}]
    out = tt.summarize("tiny", runs, data, {"axolotl": "not installed: run `make peers`",
                                            "torchtune": "installed but does not import: mask\n  File \"x.py\", "
                                                         "line 9\nModuleNotFoundError: No module named 'torchao.x'"})
    assert out["arms"]["project"]["train_s"] == 1.0 and out["arms"]["project"]["val_loss"] == 5.0  # best + its loss
    assert {k for k in out if k.startswith("ratio_vs_")} == {"ratio_vs_trl_best", "ratio_vs_litgpt"}
    assert set(out["not_run"]) == {"axolotl", "llamafactory", "torchtune"}
    assert "ValueError: no CPU" in out["not_run"]["llamafactory"]
    assert out["not_run"]["torchtune"] == "ModuleNotFoundError: No module named 'torchao.x'"  # one line
    assert out["steps_differ"] == {"litgpt": 2}  # the project took 1 step
    printed = capsys.readouterr().out
    assert "llamafactory  not run: llamafactory-cli failed" in printed and "axolotl       not run:" in printed
    assert "note: litgpt took 2 optimizer step(s) where the project took 1" in printed


def test_tiny_smoke_run_trains_every_arm_and_reports_each(tmp_path):
    """trl defaults, trl's best settings and the project really train (one subprocess each); a peer that is not
    installed is reported with the reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "FINETUNE_PEER_VENVS": str(tmp_path / "no-peers")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--rows", "24", "--repeats", "1",
                           "--peers", "axolotl"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tiny = out["by_model"]["tiny"]
    arms, data = tiny["arms"], tiny["data"]
    assert list(arms) == ["trl_default", "trl_best", "project"] and out["model"] == "tiny"
    for name, arm in arms.items():
        assert arm["label_tokens_per_s"] > 0 and arm["steps"] > 0 and arm["peak_rss_mb"] > 100, name
        assert math.isfinite(arm["val_loss"]) and arm["val_loss"] > 0 and arm["quant"] == "nf4", name
    d, b = arms["trl_default"], arms["trl_best"]
    assert (d["packing"], d["bf16"], d["gradient_checkpointing"], d["micro_batch"]) == (False, True, True, 8)
    assert d["accumulation"] == data["trl_default_accumulation"] and d["computed_tokens"] > data["tokens"]  # pads
    assert (b["packing"], b["gradient_checkpointing"], b["bf16"]) == (True, False, data["auto_dtype"] == "bfloat16")
    assert b["steps"] == arms["project"]["steps"] and b["computed_tokens"] == data["tokens"]  # same step size
    assert data["max_length"] == 2048 and data["tokens_per_step"] == 4 * 2048  # micro-batch 1 x 4 packed rows
    assert {k for k in out if k.startswith("ratio_vs_")} == {"ratio_vs_trl_default", "ratio_vs_trl_best"}
    assert "not installed" in out["not_run"]["axolotl"]
    assert set(out["goals_met"]) == {"ratio_vs_trl_best>=1.5", "val_loss_within_1%_of_trl_best"}
    table = proc.stdout.split("label tok/s")[-1]
    assert all(f"  {name} " in table for name in arms) and "axolotl       not run: not installed" in table
    assert not list(tmp_path.glob("bench-*"))  # the work directory lives in the system temp dir and is removed
