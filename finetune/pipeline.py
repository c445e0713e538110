"""The whole job of `finetune train`: data -> adapter -> merged model -> evaluation, in one run directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.schema import FinetuneConfig

log = logging.getLogger("finetune")


def prepare_data(cfg: FinetuneConfig, run_dir: Path):
    """Tokenizer + preprocessed splits; writes data/stats.json."""
    from finetune.data import build_datasets, write_stats
    from finetune.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    splits = build_datasets(cfg.data, tokenizer)
    write_stats(splits.stats, run_dir)
    return tokenizer, splits


def run_training(cfg: FinetuneConfig, run_dir: Path) -> dict:
    """Train, then merge and evaluate unless disabled. Returns the one-line run summary."""
    from finetune.train import train

    run_dir = Path(run_dir)
    tokenizer, splits = prepare_data(cfg, run_dir)
    result = train(cfg, splits, tokenizer, run_dir)
    summary = {
        "run_dir": str(run_dir),
        "steps": result.steps,
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "eval_loss": result.eval_loss,
        "train_seconds": round(result.seconds, 1),
        "adapter": str(result.adapter_dir),
    }
    if cfg.merge.enabled:
        from finetune.merge import merge_adapter

        summary["merged"] = str(merge_adapter(cfg, run_dir))
        if cfg.eval.enabled:
            from finetune.evaluation import evaluate_run

            summary["eval"] = evaluate_run(cfg, run_dir, val=splits.val)
    print(json.dumps(summary))
    return summary
