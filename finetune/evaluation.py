"""Post-training inference checks: generate on held-out rows, score, report, gate."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.runs import write_json_atomic, write_text_atomic
from finetune.schema import FinetuneConfig

log = logging.getLogger("finetune.eval")


class GateFailure(FinetuneError):
    """A configured quality gate was missed; the CLI exits non-zero."""


def score_row(generated: str, target: str, task: str, schema: str) -> dict:
    """Per-row metrics: exact match always; JSON and schema validity for structured rows."""
    row = {"exact_match": float(generated.strip() == target.strip())}
    if task == "structured":
        import jsonschema

        try:
            value = json.loads(generated)
            row["json_valid"] = 1.0
        except ValueError:
            value, row["json_valid"] = None, 0.0
        ok = 0.0
        if row["json_valid"] and schema:
            try:
                jsonschema.validate(value, json.loads(schema))
                ok = 1.0
            except jsonschema.ValidationError:
                ok = 0.0
        row["schema_valid"] = ok
    return row


def aggregate(rows: list[dict]) -> dict:
    """Mean of each metric over the rows that have it; names end in _rate for validity metrics."""
    names = {"exact_match": "exact_match", "json_valid": "json_valid_rate", "schema_valid": "schema_valid_rate",
             "stopped": "stopped_rate"}
    out: dict[str, float] = {}
    for key, name in names.items():
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[name] = sum(vals) / len(vals)
    out["rows"] = len(rows)
    return out


def check_gates(metrics: dict, gates: dict[str, float]) -> list[str]:
    """Messages for each gate missed (metric below its threshold, or not measured)."""
    missed = []
    for name, threshold in gates.items():
        if name not in metrics:
            missed.append(f"gate eval.gates.{name}={threshold}: metric {name!r} was not measured "
                          f"(measured: {', '.join(sorted(metrics))})")
        elif metrics[name] < threshold:
            missed.append(f"gate eval.gates.{name} missed: {metrics[name]:.4f} < {threshold}")
    return missed


def evaluate_model(model, tokenizer, val, cfg: FinetuneConfig) -> tuple[dict, list[dict]]:
    """Generate on `val` rows and score them. Returns (metrics, predictions)."""
    from finetune.data import render_prompt
    from finetune.generate import generate

    rows = list(val)
    if cfg.eval.max_samples:
        rows = rows[: cfg.eval.max_samples]
    prompts = [render_prompt(tokenizer, json.loads(r["messages"])[:-1]) for r in rows]
    gens = generate(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    preds = []
    for r, g in zip(rows, gens):
        scores = score_row(g.text, r["target"], r["task"], r["schema"])
        scores["stopped"] = float(g.stopped)
        preds.append({"messages": json.loads(r["messages"])[:-1], "target": r["target"], "generated": g.text,
                      "task": r["task"], "new_tokens": g.new_tokens, **scores})
    return aggregate(preds), preds


def write_report(run_dir: Path, metrics: dict, preds: list[dict], gates: dict, missed: list[str]) -> Path:
    out = run_dir / "eval"
    write_json_atomic(out / "report.json", {"metrics": metrics, "gates": gates, "gates_missed": missed})
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Gates", ""] + ([f"- {m}" for m in missed] or ["- all gates met" if gates else "- none configured"])
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.json"


def evaluate_run(cfg: FinetuneConfig, run_dir: Path, val=None) -> dict:
    """Score the merged model of `run_dir` on the validation split; raise GateFailure when a gate is missed."""
    from finetune.generate import load_merged
    from finetune.model import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    merged = Path(cfg.merge.output or run_dir / "merged")
    model, tokenizer = load_merged(merged, device, resolve_dtype(cfg.merge.dtype, device))
    if val is None:
        from finetune.data import build_datasets

        val = build_datasets(cfg.data, tokenizer).val
    if len(val) == 0:
        raise FinetuneError("no validation rows to evaluate: add a source with split: val or set data.val_fraction")
    metrics, preds = evaluate_model(model, tokenizer, val, cfg)
    missed = check_gates(metrics, cfg.eval.gates.active())
    write_report(run_dir, metrics, preds, cfg.eval.gates.active(), missed)
    log.info("eval: %s", json.dumps(metrics))
    if missed:
        raise GateFailure("quality gate missed:\n" + "\n".join(f"  - {m}" for m in missed))
    return metrics
