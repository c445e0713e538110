"""The evaluation report: eval/report.json, eval/report.md, eval/predictions.jsonl, plots/eval_metrics.png.

report.json is the machine-readable contract (model cards and CI read it):
    {"model", "settings", "metrics" (tuned), "base", "delta" (tuned - base), "base_cached" (the cache entry the
     base's scores came from, finetune.evaluation.base_cache), "gates", "gates_missed",
     "checkpoints": [{"step", "metrics"}], "benchmarks": {"tuned"|"base": {task: {metric: value}}}}
Keys other than model/settings/metrics/gates/gates_missed are present only when measured.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.evaluation.metrics import row_quality, word_diff
from finetune.files import write_json_atomic, write_text_atomic

# Report order; metrics not listed follow in their own order.
ORDER = ["exact_match", "normalized_match", "json_valid_rate", "schema_valid_rate", "field_precision",
         "field_recall", "field_f1", "chrf", "stopped_rate", "target_loss", "target_perplexity"]
LOWER_IS_BETTER = {"target_loss", "target_perplexity"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "–" if v is None else str(v)


def _ordered(metrics: dict) -> list[str]:
    skip = {"rows", "rows_structured", "rows_text", "target_tokens", "generated_tokens_per_s"}
    return [k for k in ORDER if k in metrics] + [k for k in metrics if k not in ORDER and k not in skip]


def metrics_table(report: dict) -> list[str]:
    """Markdown table: metric | base | tuned | change (or metric | tuned without a base)."""
    tuned, base = report["metrics"], report.get("base")
    if base is None:
        return ["| metric | tuned |", "|---|---:|"] + [f"| {k} | {_fmt(tuned[k])} |" for k in _ordered(tuned)]
    lines = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    for k in _ordered(tuned):
        d = report.get("delta", {}).get(k)
        better = None if d is None or d == 0 else (d < 0) == (k in LOWER_IS_BETTER)
        mark = "" if better is None else (" ▲" if better else " ▼")
        change = "–" if d is None else f"{d:+.4f}{mark}"
        lines.append(f"| {k} | {_fmt(base.get(k))} | {_fmt(tuned[k])} | {change} |")
    return lines


def _cut(text: str, n: int = 400) -> str:
    return text if len(text) <= n else text[:n] + f" … ({len(text) - n} more characters)"


def _example(p: dict) -> list[str]:
    prompt = p["messages"][-1]["content"] if p["messages"] else ""
    lines = [f"**{p.get('origin') or 'row'}** ({p['task']}; exact match {int(p['exact_match'])}"
             + (f", field F1 {p['field_f1']:.2f}" if "field_f1" in p else "")
             + (f", chrF {p['chrf']:.1f}" if "chrf" in p else "")
             + ("" if p.get("stopped", 1) else ", cut at max_new_tokens") + ")", "",
             "```text", f"prompt:    {_cut(prompt)}", f"expected:  {_cut(p['target'])}",
             f"generated: {_cut(p['generated'])}", f"diff:      {_cut(word_diff(p['target'], p['generated']), 800)}",
             "```", ""]
    return lines


def examples_section(preds: list[dict], n: int) -> list[str]:
    """The n best and n worst rows (by field F1 / chrF / exact match) with an inline word diff."""
    if n <= 0 or not preds:
        return []
    ranked = sorted(range(len(preds)), key=lambda i: (row_quality(preds[i]), -i))
    worst = ranked[: min(n, len(preds))]
    best = [i for i in reversed(ranked) if i not in worst][:n]
    out = ["## Examples", "", "Diff: `[-expected only-]{+generated only+}`.", "", "### Best", ""]
    for i in best:
        out += _example(preds[i])
    out += ["### Worst", ""]
    for i in worst:
        out += _example(preds[i])
    return out


def benchmarks_section(bench: dict) -> list[str]:
    tuned, base = bench.get("tuned", {}), bench.get("base", {})
    lines = ["## Benchmarks (lm-evaluation-harness)", "", "| task | metric | base | tuned |", "|---|---|---:|---:|"]
    for task, metrics in tuned.items():
        for name, value in metrics.items():
            lines.append(f"| {task} | {name} | {_fmt(base.get(task, {}).get(name))} | {_fmt(value)} |")
    return lines + [""]


def render_markdown(report: dict, preds: list[dict], examples: int) -> str:
    m = report["metrics"]
    lines = ["# Evaluation", "", f"Model: `{report['model']}` — {m['rows']} rows ({m.get('rows_structured', 0)} "
             f"structured, {m.get('rows_text', 0)} free text); {report['settings']['decoding']}, max_new_tokens "
             f"{report['settings']['max_new_tokens']}, constrain {report['settings']['constrain']}.", ""]
    lines += metrics_table(report) + [""]
    if report.get("base_cached"):
        lines += [f"Base scores reused from an earlier run (`{report['base_cached']}`: same base weights, rows, "
                  "tokenizer, eval settings, code and torch; `eval.base_cache=false` scores the base again).", ""]
    if "generated_tokens_per_s" in m:
        lines += [f"Generation: {m['generated_tokens_per_s']:.0f} new tokens/s (tuned).", ""]
    lines += ["## Gates", ""]
    if report["gates_missed"]:
        lines += [f"- MISSED: {g}" for g in report["gates_missed"]]
    lines += [f"- {k} {'<=' if k.startswith('max_') else '>='} {v}: met" for k, v in report["gates"].items()
              if not any(f"eval.gates.{k} " in g or f"eval.gates.{k}=" in g for g in report["gates_missed"])]
    if not report["gates"]:
        lines.append("- none configured (e.g. eval.gates.exact_match=0.9)")
    lines.append("")
    if report.get("checkpoints"):
        lines += ["## Checkpoints", "", "![metrics vs step](../plots/eval_metrics.png)", "",
                  "| step | " + " | ".join(_ordered(m)) + " |", "|---:|" + "---:|" * len(_ordered(m))]
        for h in report["checkpoints"]:
            lines.append(f"| {h['step']} | " + " | ".join(_fmt(h["metrics"].get(k)) for k in _ordered(m)) + " |")
        lines.append("")
    if report.get("benchmarks"):
        lines += benchmarks_section(report["benchmarks"])
    return "\n".join(lines + examples_section(preds, examples)) + "\n"


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Each metric against training step, one small panel per metric; None when fewer than 2 points."""
    if len(history) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    names = _ordered(history[-1]["metrics"])
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, name in zip(axes.flat, names):
        ax.plot(steps, [h["metrics"].get(name, float("nan")) for h in history], marker="o")
        ax.set_title(name, fontsize=9)
        if name == "target_perplexity":
            ax.set_yscale("log")  # an untrained base sits orders of magnitude above a trained model
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")  # written whole, then renamed
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(run_dir: Path, report: dict, preds: list[dict], *, examples: int = 3) -> Path:
    """Write eval/predictions.jsonl, eval/report.md, eval/report.json (last) and the checkpoint plot."""
    out = Path(run_dir) / "eval"
    if report.get("checkpoints"):
        plot_history(report["checkpoints"], Path(run_dir) / "plots" / "eval_metrics.png")
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    write_text_atomic(out / "report.md", render_markdown(report, preds, examples))
    return write_json_atomic(out / "report.json", report)
