"""The base-vs-tuned table printed at the end of `finetune train` / `finetune eval`: one glance, no JSON.

    held-out rows: 70 (greedy, max 96 new tokens, unconstrained)
    metric              base    tuned   change   gate
    json_valid_rate    0.000    1.000   +1.000   >= 0.98  pass
    ...
"""
from __future__ import annotations

from typing import Any

# Shown first, in this order, when present; other metrics follow alphabetically.
ORDER = ("exact_match", "json_valid_rate", "schema_valid_rate", "field_f1", "tool_call_valid_rate",
         "tool_name_match_rate", "tool_args_valid_rate", "tool_args_f1", "chrf", "stopped_rate", "target_loss",
         "target_perplexity")
HIDDEN = ("rows", "generated_tokens_per_s", "target_tokens", "rows_structured", "rows_text", "rows_tool_call", "normalized_match", "field_precision",
          "field_recall", "tool_args_precision", "tool_args_recall")


def _gate_text(name: str, gates: dict[str, float], value: float | None) -> str:
    for gate, limit in gates.items():
        metric = gate[4:] if gate.startswith("max_") else gate
        if metric != name:
            continue
        if value is None:
            return f"{'<=' if gate.startswith('max_') else '>='} {limit:g}  n/a"
        ok = value <= limit if gate.startswith("max_") else value >= limit
        return f"{'<=' if gate.startswith('max_') else '>='} {limit:g}  {'pass' if ok else 'FAIL'}"
    return ""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def comparison_table(report: dict) -> str:
    """Text table of the tuned metrics against the base (when scored), with the change and each gate."""
    tuned, base = report.get("metrics", {}), report.get("base") or {}
    gates = report.get("gates") or {}
    names = [n for n in ORDER if n in tuned] + sorted(n for n in tuned if n not in ORDER and n not in HIDDEN)
    s = report.get("settings", {})
    head = (f"held-out rows: {int(tuned.get('rows', 0)) or '?'} ({s.get('decoding', 'greedy')}, max "
            f"{s.get('max_new_tokens', '?')} new tokens, {'constrained: ' + s['constrain'] if s.get('constrain', 'none') != 'none' else 'unconstrained'})")
    width = max([len(n) for n in names] + [6])
    lines = [head, f"{'metric':<{width}}  {'base':>8}  {'tuned':>8}  {'change':>8}  gate"]
    for n in names:
        b, t = base.get(n), tuned.get(n)
        change = f"{t - b:+.3f}" if b is not None and t is not None else "-"
        lines.append(f"{n:<{width}}  {_fmt(b):>8}  {_fmt(t):>8}  {change:>8}  {_gate_text(n, gates, t)}".rstrip())
    missed = report.get("gates_missed") or []
    if gates:
        lines.append(f"gates: {len(gates) - len(missed)} of {len(gates)} met" + (": " + "; ".join(missed) if missed else ""))
    return "\n".join(lines)
