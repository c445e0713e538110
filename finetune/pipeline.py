"""The whole job of `finetune train`: data -> adapter -> merged model -> evaluation, in one run directory."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

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
    from finetune.train.trainer import environment_problems

    device = resolve_device(cfg.device)
    problems = launch_problems(
        launch=launch_info(), per_device_batch=cfg.train.per_device_train_batch_size,
        global_batch=cfg.train.global_batch_size,
        quant_method=cfg.quant.method, storage_dtype=cfg.quant.storage_dtype, deepspeed_config=cfg.train.deepspeed)
    problems += environment_problems(cfg, device) + target_module_problems_from_config(cfg.model, cfg.peft)
    if problems:
        raise ConfigError(problems)


def run_training(cfg: FinetuneConfig, run_dir: Path) -> dict:
    """Train (continuing from a checkpoint per train.resume), then merge and evaluate unless disabled.

    Prints and returns the one-line JSON run summary.
    """
    from finetune.train.checkpoint import step_of, trim_metrics
    from finetune.distributed import is_main_process
    from finetune.train.trainer import train

    run_dir = Path(run_dir)
    preflight(cfg)
    resume_from = resolve_resume(cfg, run_dir)
    planned = _log_plan(cfg)
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
    if cfg.merge.enabled:
        from finetune.merge.stream import merge_adapter

        summary["merged"] = str(merge_adapter(cfg, run_dir))
        if cfg.eval.enabled:
            from finetune.evaluation.run import evaluate_run

            summary["eval"] = evaluate_run(cfg, run_dir, val=splits.val)
    print(json.dumps(summary))
    return summary


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
