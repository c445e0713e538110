"""Post-training inference checks: generate on held-out rows, score, compare with the base, report, gate.

`finetune eval run=<dir>` and the end of `finetune train` call evaluate_run. The tuned model is the
merged one (what ships); the base is the same weights without the adapter, loaded unquantized, and is
scored on the same rows with the same tokenizer and chat template, so only the adapter differs.
"""
from __future__ import annotations

import gc
import dataclasses
import json
import math
import logging
import time
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.evaluation.metrics import aggregate, deltas, score_row
from finetune.config import FinetuneConfig

log = logging.getLogger("finetune.eval")


class GateFailure(FinetuneError):
    """A configured quality gate was missed; the CLI exits non-zero (2)."""


def check_gates(metrics: dict, gates: dict[str, float]) -> list[str]:
    """One message per gate missed: which gate, its threshold and the measured value.

    `max_<metric>` gates are upper bounds, all others lower bounds. A gate on a metric that was not
    measured (e.g. json_valid_rate with no structured rows) is missed: a silent pass would hide it.
    """
    missed = []
    for name, threshold in gates.items():
        metric, upper = (name[4:], True) if name.startswith("max_") else (name, False)
        value = metrics.get(metric)
        if value is None:
            missed.append(f"gate eval.gates.{name}={threshold}: metric {metric!r} was not measured on these rows "
                          f"(measured: {', '.join(sorted(k for k in metrics if not k.startswith('rows')))})")
        elif (value > threshold) if upper else (value < threshold):
            op = ">" if upper else "<"
            missed.append(f"gate eval.gates.{name} missed: {metric} = {value:.4f} {op} threshold {threshold}")
    return missed


def target_loss(model: Any, rows: list[dict], tokens_per_batch: int = 4096) -> dict[str, float]:
    """Mean cross-entropy and perplexity over the label tokens (assistant_masks) of tokenized rows.

    Token-weighted over all rows, the quantity trl's eval_loss estimates. Rows are length-sorted and
    batched by padded size; only the positions that predict a label get logits (`logits_to_keep`),
    which at Qwen2.5's 151,936-word vocabulary is what keeps memory bounded: full fp32 logits of
    4,096 tokens alone are 2.5 GB.
    """
    import torch
    import torch.nn.functional as F

    from finetune.distributed import progress

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for batch in progress(_token_batches(rows, tokens_per_batch), desc="target loss", unit="batch"):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, r in enumerate(batch):  # right padding: positions stay 0..n-1 as in training
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            attn[b, :n] = 1
            labels[b, :n] = torch.where(torch.tensor(r["assistant_masks"]) > 0, ids[b, :n], -100)
        labels[:, 0] = -100  # nothing predicts the first token
        keep = torch.nonzero((labels[:, 1:] != -100).any(0)).flatten()  # positions t-1 that predict a label t
        if keep.numel() == 0:
            continue
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                           logits_to_keep=keep.to(device)).logits.float()
        gold = labels[:, keep + 1].to(device)
        total += F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((gold != -100).sum())
    if count == 0:
        return {}
    mean = total / count
    return {"target_loss": mean, "target_perplexity": float(torch.exp(torch.tensor(mean))), "target_tokens": count}


def _token_batches(rows: list[dict], tokens_per_batch: int) -> list[list[dict]]:
    """Length-sorted rows in batches of at most `tokens_per_batch` padded tokens (a longer row goes alone)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]]["input_ids"]) <= tokens_per_batch:
            end += 1
        batches.append([rows[i] for i in order[start:end]])
        start = end
    return batches


def _constraint(cfg: FinetuneConfig, model: Any, tokenizer: Any, rows: list[dict]):
    """A logits_processor_factory for generate() when eval.constrain=json_schema, else None."""
    if cfg.eval.constrain != "json_schema":
        return None
    from finetune.generate.generation import schema_processor_factory

    vocab = model.get_output_embeddings().weight.shape[0]  # logits width, may exceed len(tokenizer)
    return schema_processor_factory(tokenizer, [json.loads(r["schema"]) for r in rows], vocab)


def _continuations(rows: list[dict], prompts: list[list[int]]) -> list[tuple[list[int], list[int]] | None]:
    """Each row's tokens after its generation prompt with their label mask; None for a row that does not start
    with its prompt or has a label inside it (target_loss() scores those in a pass of their own). Templates that
    render history differently from a generation prompt fail the first test, multi-turn rows trained on every
    assistant turn the second."""
    out = []
    for r, p in zip(rows, prompts):
        ids = list(r.get("input_ids") or ())
        fits = len(ids) > len(p) and ids[:len(p)] == list(p) and not any(r["assistant_masks"][:len(p)])
        out.append((ids[len(p):], list(r["assistant_masks"][len(p):])) if fits else None)
    return out


def _generate(cfg: FinetuneConfig, model: Any, tokenizer: Any, rows: list[dict], *, scored: bool = False):
    """Generations for `rows`, in order (greedy unless eval.do_sample); structured rows constrained when
    eval.constrain=json_schema. With `scored`, each row's target is also scored teacher-forced in the same
    prefill where the model and template allow it (generate(score=...)); the second value says whether it was."""
    from finetune.data import render_prompt
    from finetune.generate.generation import can_share_prefill, generate

    # Tool-call rows render their tool definitions into the prompt, as in training.
    prompts = [render_prompt(tokenizer, json.loads(r["messages"])[:-1], json.loads(r["tools"]) if r.get("tools")
                             else None) for r in rows]
    conts = _continuations(rows, prompts) if scored and can_share_prefill(model) is None else None
    e = cfg.eval
    kw: dict[str, Any] = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, desc="eval: generate")
    if e.do_sample:
        import torch

        torch.manual_seed(e.seed)  # same seed for tuned and base: the comparison is not luck of the draw
        kw.update(do_sample=True, temperature=e.temperature, top_p=e.top_p)
    constrained = [i for i, r in enumerate(rows) if r["task"] == "structured" and r["schema"]]
    if cfg.eval.constrain == "none" or not constrained:
        return generate(model, tokenizer, prompts, score=conts, **kw), conts is not None
    # Only structured rows have a schema to enforce; the others run unconstrained in their own batches.
    free = sorted(set(range(len(rows))) - set(constrained))
    out: list = [None] * len(rows)
    sub = [rows[i] for i in constrained]
    for i, g in zip(constrained, generate(model, tokenizer, [prompts[i] for i in constrained],
                                          logits_processor_factory=_constraint(cfg, model, tokenizer, sub),
                                          score=[conts[i] for i in constrained] if conts else None, **kw)):
        out[i] = g
    for i, g in zip(free, generate(model, tokenizer, [prompts[i] for i in free],
                                   score=[conts[i] for i in free] if conts else None, **kw)):
        out[i] = g
    return out, conts is not None


def eval_rows(val: Any, cfg: FinetuneConfig) -> list[dict]:
    """The rows evaluate_model scores: the first eval.max_samples of `val` (all without it)."""
    return [dict(r) for r in val][: cfg.eval.max_samples or None]


def evaluate_model(model: Any, tokenizer: Any, val: Any, cfg: FinetuneConfig) -> tuple[dict, list[dict]]:
    """Generate on the val rows (first eval.max_samples), score them, and measure target loss.

    Args:
        model, tokenizer: a causal LM and the tokenizer whose chat template the rows were trained with.
        val: rows with messages (JSON), task, schema, target, input_ids, assistant_masks.
        cfg: eval.* picks max_new_tokens, batch size, constraint and whether to compute the loss.
    Returns:
        (metrics, per-row predictions with their scores).
    """
    rows = eval_rows(val, cfg)
    started = time.perf_counter()
    want_loss = bool(cfg.eval.loss and rows and "input_ids" in rows[0])
    gens, scored = _generate(cfg, model, tokenizer, rows, scored=want_loss)
    seconds = time.perf_counter() - started
    preds = []
    for r, g in zip(rows, gens):
        scores = score_row(g.text, r["target"], r["task"], r["schema"])
        scores["stopped"] = float(g.stopped)
        preds.append({"origin": r.get("origin", ""), "task": r["task"], "messages": json.loads(r["messages"])[:-1],
                      "target": r["target"], "generated": g.text, "new_tokens": g.new_tokens, **scores})
    metrics = aggregate(preds)
    new_tokens = sum(p["new_tokens"] for p in preds)
    metrics["generated_tokens_per_s"] = new_tokens / seconds if seconds > 0 else 0.0
    timing = f"eval: {len(rows)} rows, {new_tokens} new tokens in {seconds:.1f} s"
    if scored:  # the target loss came with the generation prefill, but for rows it could not score
        started = time.perf_counter()
        total, count = sum(g.target_nll for g in gens), sum(g.target_tokens for g in gens)
        rest = [r for r, g in zip(rows, gens) if g.target_tokens == 0]
        if rest:
            other = target_loss(model, rest, cfg.eval.loss_tokens_per_batch)
            if other:
                total, count = total + other["target_loss"] * other["target_tokens"], count + other["target_tokens"]
        if count:
            mean = total / count
            metrics.update(target_loss=mean, target_perplexity=math.exp(mean), target_tokens=count)
        timing += (f" (target loss of {len(rows) - len(rest)} rows scored in the same prefill; the other "
                   f"{len(rest)} in {time.perf_counter() - started:.1f} s)")
    elif want_loss:
        started = time.perf_counter()
        metrics.update(target_loss(model, rows, cfg.eval.loss_tokens_per_batch))
        timing += f"; target loss in {time.perf_counter() - started:.1f} s"
    log.info(timing)
    return metrics, preds


def _release_memory() -> None:
    """Collect dropped models now: the tuned and the base 3B model in bf16 are 6 GB each on one GPU."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merged_checkpoint(cfg: FinetuneConfig, ckpt: Path, device: str):
    """A checkpoint's adapter merged in memory into the unquantized base, as `finetune merge` does."""
    from finetune.models.adapter import load_adapter_model

    return load_adapter_model(cfg, ckpt, device, quantize=False).merge_and_unload()


def _same_file(a: Path, b: Path) -> bool:
    import filecmp

    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def _compare_base(cfg: FinetuneConfig, report: dict, preds: list[dict], val: Any, tokenizer: Any,
                  run_dir: Path, tokenizer_dir: Path) -> list[dict]:
    """Score the base without the adapter into report["base"] / ["delta"] (and each prediction's "base"),
    or take those scores from an earlier run's (finetune.evaluation.base_cache) when nothing they depend on
    changed.

    Returns the base as the step-0 point of the checkpoint history: LoRA starts with B = 0, so the
    model at step 0 is the base.
    """
    from finetune.evaluation import base_cache
    from finetune.models.load import load_base_model, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    rows = eval_rows(val, cfg)
    key = None
    if cfg.eval.base_cache:
        try:
            key = base_cache.cache_key(cfg, rows, tokenizer_dir, device, resolve_dtype(cfg.quant.compute_dtype, device))
        except OSError as e:  # a file that cannot be read for the key: the base is scored, as without the cache
            log.warning("base scores not cached: %s", e)
    cached = base_cache.load(key[0], len(rows)) if key else None
    base = None
    if cached is not None:
        report["base"], base_rows = cached
        report["base_cached"] = str(base_cache.entry_path(key[0]))
        log.info("eval: base scores of %d rows reused from %s (same base weights, rows, tokenizer, eval settings, "
                 "code and torch; eval.base_cache=false scores the base again)", len(rows), report["base_cached"])
    else:
        # Loaded unquantized, like the base the adapter was merged into; the tuned tokenizer (same
        # vocabulary) renders the prompts, so only the weights differ.
        base = load_base_model(cfg.model, cfg.quant, device, quantize=False)
        report["base"], base_preds = evaluate_model(base, tokenizer, val, cfg)
        base_rows = [{k: v for k, v in b.items() if k not in ("origin", "task", "messages", "target")}
                     for b in base_preds]
        if key:
            base_cache.store(key[0], key[1], report["base"], base_rows)
    report["delta"] = deltas(report["metrics"], report["base"])
    for p, b in zip(preds, base_rows):
        p["base"] = b
    if cfg.eval.tasks:
        from finetune.evaluation.harness import run_benchmarks

        if base is None:  # lm-eval's scores are not part of the cache
            base = load_base_model(cfg.model, cfg.quant, device, quantize=False)
        report["benchmarks"]["base"] = run_benchmarks(cfg, base, tokenizer, run_dir / "eval", tag="base")
    del base
    _release_memory()
    return [{"step": 0, "metrics": report["base"]}]


def _checkpoint_history(cfg: FinetuneConfig, run_dir: Path, tuned: dict, val: Any, tokenizer: Any) -> list[dict]:
    """Metrics of every checkpoints/checkpoint-N adapter, merged in memory, by step."""
    from finetune.models.load import resolve_device
    from finetune.train.checkpoint import ADAPTER_FILES, complete_checkpoints, step_of

    history = []
    for ckpt in complete_checkpoints(run_dir / "checkpoints", ADAPTER_FILES):
        step = step_of(ckpt)
        if _same_file(ckpt / "adapter_model.safetensors", run_dir / "adapter" / "adapter_model.safetensors"):
            history.append({"step": step, "metrics": tuned})  # the adapter merged/ was made from: scored already
            continue
        model = _merged_checkpoint(cfg, ckpt, resolve_device(cfg.device))
        history.append({"step": step, "metrics": evaluate_model(model, tokenizer, val, cfg)[0]})
        del model
        _release_memory()
    return history


def evaluate_run(cfg: FinetuneConfig, run_dir: Path, val=None) -> dict:
    """Score the merged model of `run_dir` (and the base, checkpoints, benchmarks as configured).

    Writes <run>/eval/report.json, report.md, predictions.jsonl (and plots/eval_metrics.png with
    eval.checkpoints=true) before checking gates, so a failed gate still leaves the full report.
    Returns the tuned model's metrics. Raises GateFailure naming each gate missed.
    """
    from finetune.evaluation.report import write_report
    from finetune.generate.generation import load_merged
    from finetune.models.load import resolve_device, resolve_dtype
    from finetune.models.provenance import checked_artifact

    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    merged = Path(cfg.merge.output or run_dir / "merged")
    provenance = checked_artifact(merged, run_dir)  # merged/ was made from this run's adapter and base
    # The compute dtype of training, which the base comparison uses too (load_base_model): the two columns of
    # the report differ in the adapter only, not in bf16 against fp32 arithmetic.
    model, tokenizer = load_merged(merged, device, resolve_dtype(cfg.quant.compute_dtype, device))
    if val is None:
        from finetune.data import build_datasets

        val = build_datasets(cfg.data, tokenizer).val
    if val is None or len(val) == 0:
        raise FinetuneError("no validation rows to evaluate: add a data source with split: val, or set "
                            "data.val_fraction > 0")
    report: dict[str, Any] = {"model": str(merged), "provenance": provenance, "settings": _settings(cfg),
                              "eval_config": dataclasses.asdict(cfg.eval)}  # what the model card shows
    report["metrics"], preds = evaluate_model(model, tokenizer, val, cfg)
    if cfg.eval.tasks:
        from finetune.evaluation.harness import run_benchmarks

        report["benchmarks"] = {"tuned": run_benchmarks(cfg, model, tokenizer, run_dir / "eval")}
    del model
    _release_memory()
    history = _compare_base(cfg, report, preds, val, tokenizer, run_dir, merged) if cfg.eval.compare_base else []
    if cfg.eval.checkpoints:
        report["checkpoints"] = history + _checkpoint_history(cfg, run_dir, report["metrics"], val, tokenizer)
    gates = cfg.eval.gates.active()
    report["gates"], report["gates_missed"] = gates, check_gates(report["metrics"], gates)
    write_report(run_dir, report, preds, examples=cfg.eval.examples)
    if (merged / "README.md").is_file():  # the merged model's card carries the metrics just measured
        from finetune.merge.model_card import write_model_card

        write_model_card(merged, run_dir)
    log.info("eval: %s", json.dumps({k: round(v, 4) for k, v in report["metrics"].items()}))
    if report["gates_missed"]:
        raise GateFailure("quality gate missed (report: " + str(run_dir / "eval" / "report.md") + "):\n"
                          + "\n".join(f"  - {m}" for m in report["gates_missed"]))
    return report["metrics"]


def _settings(cfg: FinetuneConfig) -> dict:
    e = cfg.eval
    decoding = f"sampled (temperature {e.temperature}, top_p {e.top_p}, seed {e.seed})" if e.do_sample else "greedy"
    from finetune.models.load import resolve_device, resolve_dtype

    dtype = str(resolve_dtype(cfg.quant.compute_dtype, resolve_device(cfg.device))).removeprefix("torch.")
    return {"decoding": decoding, "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size,
            "constrain": e.constrain, "max_samples": e.max_samples, "compare_base": e.compare_base,
            "compute_dtype": dtype}
