"""The comparison itself, on plain data (no torch, no engine): what `finetune verify` writes and decides.

Every engine hands back, per prompt, the prompt ids it rendered and tokenized itself, its greedy tokens, the token
that ended the reply (None when max_new_tokens cut it) and, where it gives them, the top log-probabilities per
generated position. Each engine is compared with the reference (the merged folder in transformers):

- identical outputs: same tokens and same stop;
- token agreement: tokens before the first divergence over the longer reply, the stop counted as a token, summed
  over prompts (after a divergence greedy replies drift apart, so position-wise equality would mean nothing);
- first divergence: where, the text before it, and the next tokens of each side;
- template check: the engine's prompt ids equal the reference's (a wrong chat template or tokenizer shows here);
- stop check: where the engine produced the whole reference reply, it ended it with the same stop token;
- max |Δ logprob|: over the top tokens both report, at the positions before the first divergence (and at it).

A pair fails when its agreement is below its threshold, or on any template or stop difference (those mean an
artifact is wrong, not rounding). An engine that crashed fails; one that is not installed is skipped, with the
command that installs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REFERENCE = "merged"
CONTEXT_TOKENS = 8  # tokens of text shown before a divergence: enough to place it in a 32-token reply
AHEAD_TOKENS = 4  # tokens shown after it on each side


@dataclass
class Completion:
    prompt_ids: list[int]  # the prompt as this engine rendered and tokenized it
    token_ids: list[int]  # greedy tokens, the stop token excluded
    stop: Optional[int]  # the token that ended the reply; None: cut at max_new_tokens
    top_logprobs: Optional[list[dict[int, float]]] = None  # per generated position (stop included): id -> logprob

    def sequence(self) -> list[int]:
        return self.token_ids + ([self.stop] if self.stop is not None else [])


@dataclass
class EngineResult:
    name: str  # adapter | merged | gguf | vllm_merged | vllm_lora
    label: str  # what ran, for people
    completions: list[Completion] = field(default_factory=list)
    skipped: Optional[str] = None  # why it did not run (not installed, no artifact)
    install: Optional[str] = None  # the command that makes it runnable
    error: Optional[str] = None  # it ran and failed: the artifact did not load, the engine crashed
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # engine version, dtype, file, ...

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else "error" if self.error else "ran"


def skipped(name: str, label: str, why: str, install: Optional[str] = None) -> EngineResult:
    return EngineResult(name, label, skipped=why, install=install)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def divergence(ref: list[int], got: list[int], decode: Callable[[list[int]], str]) -> dict:
    """Where two id sequences first differ, with the text before it and the next tokens of each side."""
    k = common_prefix(ref, got)
    return {"position": k, "context": decode(ref[max(0, k - CONTEXT_TOKENS):k]),
            "reference": decode(ref[k:k + AHEAD_TOKENS]) if k < len(ref) else "<end>",
            "engine": decode(got[k:k + AHEAD_TOKENS]) if k < len(got) else "<end>"}


def _logprob_diff(a: Optional[list[dict]], b: Optional[list[dict]], upto: int) -> Optional[float]:
    if not a or not b:
        return None
    worst = None
    for pa, pb in zip(a[:upto + 1], b[:upto + 1]):
        for tok in pa.keys() & pb.keys():
            d = abs(pa[tok] - pb[tok])
            worst = d if worst is None or d > worst else worst
    return worst


def compare_pair(ref: EngineResult, other: EngineResult, threshold: float,
                 decode: Callable[[list[int]], str]) -> dict:
    """One engine against the reference: per-prompt rows, summary, pass/fail and why."""
    base = {"engine": other.name, "label": other.label, "reference": ref.name, "threshold": threshold,
            "status": other.status}
    if other.skipped:
        return {**base, "ok": None, "skipped": other.skipped, "install": other.install}
    if other.error:
        return {**base, "ok": False, "failures": [f"{other.name}: {other.error}"]}
    if len(other.completions) != len(ref.completions):
        return {**base, "ok": False, "failures": [f"{other.name} answered {len(other.completions)} of "
                                                  f"{len(ref.completions)} prompts"]}
    rows, matched, longest = [], 0, 0
    for k, (r, o) in enumerate(zip(ref.completions, other.completions)):
        rs, os_ = r.sequence(), o.sequence()
        prefix = common_prefix(rs, os_)
        matched, longest = matched + prefix, longest + max(len(rs), len(os_))
        whole = o.token_ids[:len(r.token_ids)] == r.token_ids  # the engine wrote the whole reference reply
        row: dict[str, Any] = {
            "prompt": k, "prompt_tokens": len(r.prompt_ids), "same_prompt_ids": r.prompt_ids == o.prompt_ids,
            "reference_tokens": len(r.token_ids), "engine_tokens": len(o.token_ids), "matching_prefix": prefix,
            "identical": rs == os_, "reference_stop": r.stop, "engine_stop": o.stop,
            "same_stop": (len(o.token_ids) == len(r.token_ids) and o.stop == r.stop) if whole else None,
            "max_abs_logprob_diff": _logprob_diff(r.top_logprobs, o.top_logprobs, prefix)}
        if not row["same_prompt_ids"]:
            row["prompt_divergence"] = divergence(r.prompt_ids, o.prompt_ids, decode)
        if not row["identical"]:
            row["first_divergence"] = divergence(rs, os_, decode)
        rows.append(row)
    agreement = matched / longest if longest else 1.0
    diffs = [x["max_abs_logprob_diff"] for x in rows if x["max_abs_logprob_diff"] is not None]
    out = {**base, "prompts": len(rows), "identical_outputs": sum(x["identical"] for x in rows),
           "token_agreement": agreement, "same_prompt_ids": all(x["same_prompt_ids"] for x in rows),
           "same_stop": not any(x["same_stop"] is False for x in rows),
           "max_abs_logprob_diff": max(diffs) if diffs else None, "rows": rows}
    failures = []
    if agreement < threshold:
        failures.append(f"{other.name}: greedy-token agreement {agreement:.4f} < threshold {threshold} "
                        f"(verify.thresholds.{other.name}); " + _first_divergence_text(rows))
    bad = [x for x in rows if not x["same_prompt_ids"]]
    if bad:
        d = bad[0]["prompt_divergence"]
        failures.append(f"{other.name} renders/tokenizes {len(bad)} of {len(rows)} prompts differently from the "
                        f"merged model (prompt {bad[0]['prompt']}, token {d['position']}: after {d['context']!r} the "
                        f"merged model has {d['reference']!r}, {other.name} {d['engine']!r}): its chat template or "
                        "tokenizer is not the artifact's")
    bad = [x for x in rows if x["same_stop"] is False]
    if bad:
        x = bad[0]
        failures.append(f"{other.name} does not end the reply where the merged model does (prompt {x['prompt']}: "
                        f"merged stops with token {x['reference_stop']}, {other.name} with "
                        f"{'max_new_tokens' if x['engine_stop'] is None else 'token ' + str(x['engine_stop'])}): "
                        "its end-of-turn / eos token set differs (generation_config.json eos_token_id)")
    return {**out, "ok": not failures, "failures": failures}


def _first_divergence_text(rows: list[dict]) -> str:
    x = next((x for x in rows if "first_divergence" in x), None)
    if x is None:
        return "no divergence"
    d = x["first_divergence"]
    return (f"first divergence: prompt {x['prompt']}, token {d['position']}, after {d['context']!r}: merged "
            f"{d['reference']!r}, engine {d['engine']!r}")


def build_report(ref: EngineResult, engines: list[EngineResult], thresholds: dict[str, float],
                 decode: Callable[[list[int]], str], *, fail_on_skipped: bool = False, **meta) -> dict:
    """The whole report: reference, one pair per engine, the decision (`ok`) and every failure for people."""
    pairs = [compare_pair(ref, e, thresholds[e.name], decode) for e in engines]
    failures = [f for p in pairs for f in p.get("failures", [])]
    failures.extend(meta.pop("reference_problems", []))
    skips = [p for p in pairs if p["status"] == "skipped"]
    if fail_on_skipped:
        failures.extend(f"{p['engine']} was skipped ({p['skipped']}) and verify.fail_on_skipped=true"
                        + (f"; install: {p['install']}" if p.get("install") else "") for p in skips)
    return {**meta, "reference": {"engine": ref.name, "label": ref.label, "seconds": round(ref.seconds, 2),
                                  "prompts": len(ref.completions), **ref.info},
            "engines": {e.name: {"label": e.label, "status": e.status, "seconds": round(e.seconds, 2), **e.info,
                                 **({"error": e.error} if e.error else {})} for e in engines},
            "pairs": pairs, "skipped": [{"engine": p["engine"], "why": p["skipped"], "install": p["install"]}
                                        for p in skips],
            "ok": not failures, "failures": failures}


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """A short table for people: one row per engine against the merged model, then the first divergences."""
    ref = report["reference"]
    lines = [f"# Cross-engine parity: {report.get('run', '')}".rstrip(), "",
             f"Reference: {ref['label']}; {ref['prompts']} held-out prompts ({report.get('prompt_source', '')}), "
             f"greedy, up to {report.get('max_new_tokens', '?')} new tokens. Result: "
             f"**{'PASS' if report['ok'] else 'FAIL'}**.", "",
             "| engine | identical outputs | token agreement | threshold | prompt ids | end-of-turn stop | "
             "max abs Δ logprob | result |",
             "|---|---|---|---|---|---|---|---|"]
    for p in report["pairs"]:
        name = f"{p['engine']} ({p['label']})"
        if p["status"] == "skipped":
            why = p["skipped"] + (f"; install: `{p['install']}`" if p.get("install") else "")
            lines.append(f"| {name} | skipped: {why} | | | | | | skipped |")
        elif "rows" not in p:
            lines.append(f"| {name} | {'; '.join(p['failures'])} | | {p['threshold']} | | | | **FAIL** |")
        else:
            lines.append(f"| {name} | {p['identical_outputs']}/{p['prompts']} | {p['token_agreement']:.4f} | "
                         f"{p['threshold']} | {'same' if p['same_prompt_ids'] else '**differ**'} | "
                         f"{'same' if p['same_stop'] else '**differ**'} | {_num(p['max_abs_logprob_diff'], '.2e')} | "
                         f"{'pass' if p['ok'] else '**FAIL**'} |")
    shown = [(p, x) for p in report["pairs"] for x in p.get("rows", []) if "first_divergence" in x]
    if shown:
        lines += ["", "First divergences (merged model vs engine):", ""]
        seen = set()
        for p, x in shown:
            if p["engine"] in seen:
                continue
            seen.add(p["engine"])
            d = x["first_divergence"]
            lines.append(f"- {p['engine']}, prompt {x['prompt']}, token {d['position']}: after `{d['context']!r}` "
                         f"merged `{d['reference']!r}`, {p['engine']} `{d['engine']!r}`")
    if report["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"
