"""The whole job of `finetune train`: data -> adapter -> merged model -> evaluation, in one run directory."""
from __future__ import annotations

import dataclasses
import json
import sys
import logging
from pathlib import Path
from typing import Callable

from finetune.errors import ConfigError, FinetuneError
from finetune.config import FinetuneConfig

log = logging.getLogger("finetune")


def prepare_data(cfg: FinetuneConfig, run_dir: Path):
    """Tokenizer + preprocessed splits; writes data/stats.json.

    Under a distributed launch rank 0 preprocesses first and fills the cache; the other ranks wait for
    it and then read the cache, so the data is built once.
    """
    from finetune.data import build_datasets, write_stats
    from finetune.distributed import is_main_process, main_process_first
    from finetune.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    with main_process_first(cfg.device):
        splits = build_datasets(cfg.data, tokenizer)
    if is_main_process():
        write_stats(splits.stats, run_dir)
    return tokenizer, splits


def memory_plan(cfg: FinetuneConfig):
    """The accelerator memory plan of this config (finetune.train.memory_plan), from `model.architecture` or, when that
    is absent, the model's config.json (never the weights).

    Raises:
        FinetuneError: no architecture numbers can be found, or the plan rejects a value (the key is named).
    """
    from finetune.train.memory_plan import plan_from_config
    from finetune.models.load import load_architecture

    arch = load_architecture(cfg.model)
    planned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, architecture=arch))
    try:
        return plan_from_config(planned)
    except ValueError as e:
        raise FinetuneError(f"memory plan: {e}") from None


def plan_text(cfg: FinetuneConfig) -> str:
    """The plan as printed by `finetune train ... train.plan_only=true` (and logged before training)."""
    from finetune.train.memory_plan import format_plan

    return (f"accelerator memory plan for {cfg.model.name_or_path} ({cfg.quant.method}, LoRA r={cfg.peft.r}, "
            f"{cfg.data.max_length} tokens x micro-batch {cfg.train.per_device_train_batch_size}):\n"
            + format_plan(memory_plan(cfg)))


def resolve_resume(cfg: FinetuneConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (train.resume), checked against the config; None = from scratch.

    Call it before anything is written to `run_dir`, so a refused resume leaves the run directory as it was.

    Raises:
        FinetuneError: the named checkpoint is missing/incomplete, or made for another base model or LoRA shape.
    """
    from finetune.train.checkpoint import check_compatible, clean_staging, find_resume_checkpoint

    clean_staging(Path(run_dir) / "checkpoints")
    checkpoint = find_resume_checkpoint(cfg.train.resume, Path(run_dir))
    if checkpoint is not None:
        check_compatible(checkpoint, cfg)
    return checkpoint


def preflight(cfg: FinetuneConfig) -> None:
    """Checks that need the resolved device or the model's config.json, all reported at once, before the data
    stage and the weights load (the config schema has checked everything else already).

    Raises:
        ConfigError: a CUDA-only option without CUDA, a logger that is not installed, an unknown module.
    """
    from finetune.distributed import launch_info, launch_problems
    from finetune.models.load import resolve_device, target_module_problems_from_config
    from finetune.train.sft import environment_problems

    device = resolve_device(cfg.device)
    problems = launch_problems(
        launch=launch_info(), per_device_batch=cfg.train.per_device_train_batch_size,
        global_batch=cfg.train.global_batch_size,
        quant_method=cfg.quant.method, storage_dtype=cfg.quant.storage_dtype, deepspeed_config=cfg.train.deepspeed)
    problems += environment_problems(cfg, device) + target_module_problems_from_config(cfg.model, cfg.peft)
    from finetune.train.guards import model_problems

    problems += model_problems(cfg)  # flash-attn installed, LoRA rank vs width, .bin-only weights
    if problems:
        raise ConfigError(problems)


def run_training(cfg: FinetuneConfig, run_dir: Path, *, before_write: Callable[[], None] | None = None) -> dict:
    """Train (continuing from a checkpoint per train.resume), then merge and evaluate unless disabled.

    Args:
        before_write: called once the checks (preflight, the resume checkpoint) have passed and before
            anything is written to `run_dir`; `finetune train` saves config.yaml there, so refused settings
            never overwrite a run's config.
    Returns:
        The one-line JSON run summary (also printed).
    """
    from finetune.train.checkpoint import step_of, trim_metrics
    from finetune.distributed import is_main_process
    from finetune.train.trainer import train

    from finetune.train.lock import finished_or_fresh, lock_run_dir, record_changes

    run_dir = Path(run_dir)
    log.info("%s", run_header(cfg))  # before anything loads: the values that decide what this run does
    preflight(cfg)
    lock = lock_run_dir(run_dir) if is_main_process() else None  # one run per directory (finetune.train.lock)
    resume_from = resolve_resume(cfg, run_dir)
    finished = finished_or_fresh(cfg, run_dir, resume_from) if is_main_process() else None
    if finished is not None:  # exactly max_steps: a finished run trains nothing more
        lock.release()
        return finished
    if before_write is not None:
        before_write()
    planned = _log_plan(cfg)
    if resume_from is not None and cfg.train.allow_changes and is_main_process():
        record_changes(run_dir / "config.yaml", resume_from)
    if resume_from is None and is_main_process():
        trim_metrics(run_dir / "metrics.jsonl", 0)  # a restart from scratch: no step may appear twice
    if resume_from is not None:
        dropped = trim_metrics(run_dir / "metrics.jsonl", step_of(resume_from)) if is_main_process() else 0
        log.info("resuming from %s (step %d; %d metrics records past it dropped)", resume_from,
                 step_of(resume_from), dropped)
    tokenizer, splits = prepare_data(cfg, run_dir)
    result = train(cfg, splits, tokenizer, run_dir, resume_from=resume_from)
    if not is_main_process():  # under torchrun/accelerate only rank 0 plots, merges, evaluates
        return {"run_dir": str(run_dir), "steps": result.steps}
    summary = {
        "run_dir": str(run_dir),
        "steps": result.steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "eval_loss": result.eval_loss,
        "train_seconds": round(result.seconds, 1),
        "label_tokens_per_s": result.label_tokens_per_s,
        "peak_memory_mb": result.peak_memory_mb,
        "planned_memory_gib": round(planned.total / 2**30, 2) if planned else None,
        "adapter": str(result.adapter_dir),
        "processes": len(result.rank_checksums),
        "rank_adapter_sha256": [c[:16] for c in result.rank_checksums],  # equal on every DDP rank (checked)
        "loss_plot": _plot(cfg, run_dir),
    }
    failures = _merge_and_evaluate(cfg, run_dir, splits.val, summary)
    lock.release()  # any other exit releases it at interpreter exit (finetune.train.lock)
    print(json.dumps(summary))
    if failures:  # after the summary and every report are written: the run is complete, its checks are not met
        raise RunChecksFailed("\n".join(failures))
    return summary


def run_header(cfg: FinetuneConfig) -> str:
    """One line: model, data, steps, learning rate, LoRA rank, max length, quantization, merge base."""
    t, d = cfg.train, cfg.data
    steps = f"{t.max_steps} steps" if t.max_steps and t.max_steps > 0 else f"{t.num_train_epochs:g} epoch(s)"
    sources = ", ".join(s.path for s in d.sources[:3]) + (f" (+{len(d.sources) - 3})" if len(d.sources) > 3 else "")
    merge = cfg.merge.base if cfg.merge.enabled else "off"
    return (f"run: model {cfg.model.gguf_file or cfg.model.name_or_path} | data {sources} | {steps}, lr "
            f"{t.learning_rate:g} | {cfg.peft.method} r {cfg.peft.r} | max length {d.max_length} | quant "
            f"{cfg.quant.method} | merge base {merge} | eval {'on' if cfg.eval.enabled and cfg.merge.enabled else 'off'}")


class RunChecksFailed(FinetuneError):
    """The run finished and wrote everything, but merge parity or a quality gate was not met (exit 2)."""


def _merge_and_evaluate(cfg: FinetuneConfig, run_dir: Path, val, summary: dict) -> list[str]:
    """Merge and evaluate as configured, filling `summary`; returns the checks that failed (parity, gates)."""
    failures: list[str] = []
    if not cfg.merge.enabled:
        return failures
    from finetune.merge.parity import parity_summary
    from finetune.merge.stream import merge_adapter

    merged = merge_adapter(cfg, run_dir)
    summary["merged"] = str(merged)
    summary["parity"] = parity_summary(merged)
    if not summary["parity"]["ok"] and cfg.merge.parity_fail:
        failures.append(f"merge parity: {summary['parity']['warning']} (merge.parity_fail=false only warns)")
    if cfg.eval.enabled:
        from finetune.evaluation.run import GateFailure, evaluate_run
        from finetune.evaluation.table import comparison_table

        try:
            summary["eval"] = evaluate_run(cfg, run_dir, val=val)
        except GateFailure as e:
            failures.append(str(e))
        report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
        summary.setdefault("eval", report["metrics"])
        summary["gates_missed"] = report.get("gates_missed", [])
        print(comparison_table(report), file=sys.stderr)  # the glance; the JSON summary stays on stdout
    return failures


def _log_plan(cfg: FinetuneConfig):
    """Log the memory plan before training; a config without architecture numbers only costs the plan."""
    try:
        plan = memory_plan(cfg)
    except FinetuneError as e:
        log.warning("no memory plan: %s", e)
        return None
    from finetune.train.memory_plan import format_plan

    log.info("accelerator memory plan (bf16 compute unless quant.compute_dtype says otherwise):\n%s",
             format_plan(plan))
    return plan


def _plot(cfg: FinetuneConfig, run_dir: Path) -> str | None:
    from finetune.train.plots import plot_losses

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    return str(plot_losses(metrics, run_dir / "plots" / "loss.png", title=f"{cfg.name}: {cfg.model.name_or_path}"))
