"""Scoring one generation against its target, and aggregating rows into report metrics.

Pure functions (no model): exact and normalised match for every row; for structured rows JSON
parse, schema validity and field-level precision / recall / F1 over flattened keys; for free-text
rows chrF from sacrebleu; for tool-call rows (task "tool_call") the call itself: it parses as a JSON
call, the function names match exactly, the arguments validate against the called tool's parameter
schema, and argument field F1 (flattened keys, as for structured rows) — the checks of NeMo AutoModel's
tool-call evaluator. Metric names end in `_rate` for shares of rows; chrF keeps sacrebleu's 0-100 scale
so it reads like published chrF figures.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from typing import Any, Iterable

# Shares of rows that have the per-row key: per-row key -> report name.
RATE_METRICS = {"exact_match": "exact_match", "normalized_match": "normalized_match",
                "json_valid": "json_valid_rate", "schema_valid": "schema_valid_rate", "stopped": "stopped_rate",
                "tool_call_valid": "tool_call_valid_rate", "tool_name_match": "tool_name_match_rate",
                "tool_args_valid": "tool_args_valid_rate", "tool_call_match": "tool_call_match_rate"}
_MISSING = object()


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, surrounding punctuation dropped.

    "Hello,  Lima!" and "hello, lima" compare equal; word order and inner punctuation still count.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" .,;:!?\"'`")


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or _MISSING when it does not parse (a whole-text parse, no extraction)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a JSON value by path: {"a": {"b": [1, 2]}} -> {"a.b[0]": 1, "a.b[1]": 2}.

    Empty objects and arrays are leaves themselves, so `{"tags": []}` still has a field to match.
    """
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix or "$": value}


def same_leaf(a: Any, b: Any) -> bool:
    """JSON leaf equality: 45 == 45.0, but true != 1 (Python's == would say True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def field_counts(pred: Any, gold: Any) -> tuple[int, int, int]:
    """(true positives, predicted fields, gold fields) over flattened paths; a pair counts when path and value match.

    An unparsable prediction (_MISSING) predicts no fields, so it costs recall only.
    """
    g = flatten(gold)
    if pred is _MISSING:
        return 0, 0, len(g)
    p = flatten(pred)
    tp = sum(1 for path, v in p.items() if path in g and same_leaf(v, g[path]))
    return tp, len(p), len(g)


def prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; an empty side counts as perfect only when both are empty."""
    precision = tp / n_pred if n_pred else float(n_gold == 0)
    recall = tp / n_gold if n_gold else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@lru_cache(maxsize=32)
def _validator(schema_text: str):
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF2, character 6-grams: sacrebleu's default, the setting published figures use


def chrf_sentence(generated: str, target: str) -> float:
    """chrF (0-100) of one generation against its target."""
    return _chrf().sentence_score(generated, [target]).score


def chrf_corpus(generated: list[str], targets: list[str]) -> float:
    """Corpus chrF (0-100): statistics summed over rows first, as sacrebleu reports it."""
    return _chrf().corpus_score(generated, [targets]).score


def parse_tool_calls(text: str) -> list[dict]:
    """Every JSON object {"name": ..., "arguments" | "parameters": {...}} in `text`, in order.

    Template-neutral: finds the call inside Qwen/Hermes `<tool_call>...</tool_call>` tags, Llama 3.1's bare
    `{"name": ..., "parameters": ...}`, Mistral's `[TOOL_CALLS][...]` or a plain JSON reply alike.
    """
    decoder, calls, k = json.JSONDecoder(), [], 0
    while True:
        k = text.find("{", k)
        if k < 0:
            return calls
        try:
            value, end = decoder.raw_decode(text, k)
        except ValueError:
            k += 1
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            args = value.get("arguments", value.get("parameters"))
            if isinstance(args, str):
                args = parse_json(args)
            calls.append({"name": value["name"], "arguments": args if isinstance(args, dict) else _MISSING})
            k = end
        else:
            k += 1


def _call_parameters(schema_text: str) -> dict[str, Any]:
    """Function name -> parameter schema, from a row's call schema (finetune.data.tools.call_schema)."""
    schema = json.loads(schema_text) if schema_text else {}
    out = {}
    for branch in schema.get("anyOf", [schema]):
        name = branch.get("properties", {}).get("name", {}).get("const")
        if name is not None:
            out[name] = branch["properties"].get("arguments") or {}
    return out


def score_tool_call(generated: str, target: str, schema: str) -> dict[str, float]:
    """Per-row tool-call metrics: tool_call_valid, tool_name_match, tool_args_valid, tool_call_match, tool_args_*."""
    pred, gold = parse_tool_calls(generated), parse_tool_calls(target)
    params = _call_parameters(schema)
    valid = bool(pred) and all(c["arguments"] is not _MISSING for c in pred)
    args_valid = valid and all(c["name"] in params and _validator(json.dumps(params[c["name"]])).is_valid(
        c["arguments"]) for c in pred)
    tp = n_pred = n_gold = 0
    for i in range(max(len(pred), len(gold))):  # calls pair up in order; an unmatched one costs its side only
        p = pred[i] if i < len(pred) and pred[i]["arguments"] is not _MISSING else None
        g = gold[i] if i < len(gold) else None
        if p is not None and g is not None and p["name"] == g["name"]:
            a, b, c = field_counts(p["arguments"], g["arguments"])
        else:
            a, b, c = 0, len(flatten(p["arguments"])) if p else 0, len(flatten(g["arguments"])) if g else 0
        tp, n_pred, n_gold = tp + a, n_pred + b, n_gold + c
    names = sorted(c["name"] for c in pred) == sorted(c["name"] for c in gold)
    return {"tool_call_valid": float(valid), "tool_name_match": float(valid and names),
            "tool_args_valid": float(args_valid),
            "tool_call_match": float(valid and names and tp == n_pred == n_gold),
            "tool_args_tp": tp, "tool_args_pred": n_pred, "tool_args_gold": n_gold,
            "tool_args_f1": prf(tp, n_pred, n_gold)[2]}


def is_json_target(target: str) -> bool:
    """A reference reply that is a JSON object or array (a bare number or string stays free text)."""
    text = target.strip()
    return text[:1] in "{[" and bool(text) and isinstance(parse_json(text), (dict, list))


def score_row(generated: str, target: str, task: str, schema: str = "") -> dict[str, float]:
    """Per-row metrics of one generation.

    Args:
        generated: the model's reply (special tokens removed).
        target: the reference reply.
        task: "structured" rows get JSON metrics, "tool_call" rows tool-call metrics (score_tool_call);
            every other task ("chat", "table") gets chrF.
        schema: the row's JSON Schema as text ("" = none; then schema_valid is not scored).
    Returns:
        exact_match, normalized_match; structured: json_valid, schema_valid, field_tp/pred/gold,
        field_f1; otherwise chrf. Values are floats so they average directly.
    """
    row = {"exact_match": float(generated.strip() == target.strip())}
    if task not in ("structured", "tool_call", "table") and is_json_target(target):
        task = "structured"  # a JSON reply is scored as JSON whatever format the row came in (messages, alpaca)
    if task == "tool_call":
        row.update(score_tool_call(generated, target, schema))
        row["normalized_match"] = row["tool_call_match"]
    elif task == "structured":
        value, gold = parse_json(generated.strip()), parse_json(target.strip())
        row["json_valid"] = float(value is not _MISSING)
        if schema:
            row["schema_valid"] = float(value is not _MISSING and _validator(schema).is_valid(value))
        if gold is not _MISSING:
            tp, n_pred, n_gold = field_counts(value, gold)
            row.update(field_tp=tp, field_pred=n_pred, field_gold=n_gold, field_f1=prf(tp, n_pred, n_gold)[2])
            # Same fields with the same values, whatever the key order or spacing: "normalised" for JSON.
            row["normalized_match"] = float(value is not _MISSING and tp == n_pred == n_gold)
        else:
            row["normalized_match"] = float(normalize_text(generated) == normalize_text(target))
    else:
        row["normalized_match"] = float(normalize_text(generated) == normalize_text(target))
        row["chrf"] = chrf_sentence(generated, target)
    return row


def row_quality(row: dict) -> float:
    """One number per row for picking best / worst examples: field F1 or chrF/100, exact match breaks ties."""
    main = row.get("field_f1", row.get("tool_args_f1",
                                       row.get("chrf", 0.0) / 100 if "chrf" in row else row["exact_match"]))
    return main + 1e-3 * row["exact_match"]


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Report metrics of scored rows (dicts from score_row plus `generated`, `target`, `task`, `stopped`).

    Rates are means over the rows that have the key; field_* are micro-averaged over all fields of all
    structured rows (a row with 10 fields weighs 10x one with 1); chrf is corpus chrF of non-structured rows.
    """
    out: dict[str, float] = {}
    for key, name in RATE_METRICS.items():
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[name] = sum(vals) / len(vals)
    counted = [r for r in rows if "field_gold" in r]
    if counted:
        p, r, f = prf(*(sum(x[k] for x in counted) for k in ("field_tp", "field_pred", "field_gold")))
        out.update(field_precision=p, field_recall=r, field_f1=f)
    calls = [r for r in rows if "tool_args_gold" in r]
    if calls:
        p, r, f = prf(*(sum(x[k] for x in calls) for k in ("tool_args_tp", "tool_args_pred", "tool_args_gold")))
        out.update(tool_args_precision=p, tool_args_recall=r, tool_args_f1=f)
    text = [r for r in rows if "chrf" in r]
    if text:
        out["chrf"] = chrf_corpus([r["generated"] for r in text], [r["target"] for r in text])
    out["rows"] = len(rows)
    out["rows_structured"] = sum("json_valid" in r for r in rows)  # JSON targets, whatever format they came in
    out["rows_text"] = len(text)
    out["rows_tool_call"] = len(calls)
    return out


def word_diff(expected: str, generated: str) -> str:
    """Inline word diff in git's --word-diff style: [-expected only-]{+generated only+}."""
    from difflib import SequenceMatcher

    split = re.compile(r"\w+|\s+|[^\w\s]")
    a, b = split.findall(expected), split.findall(generated)
    out = []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append("".join(a[i1:i2]))
            continue
        if i2 > i1:
            out.append("[-" + "".join(a[i1:i2]) + "-]")
        if j2 > j1:
            out.append("{+" + "".join(b[j1:j2]) + "+}")
    return "".join(out)


def deltas(tuned: dict, base: dict, names: Iterable[str] | None = None) -> dict[str, float]:
    """tuned - base for every numeric metric both have (row counts excluded)."""
    keys = names or [k for k in tuned if not k.startswith("rows")]
    return {k: tuned[k] - base[k] for k in keys
            if isinstance(tuned.get(k), (int, float)) and isinstance(base.get(k), (int, float))}
