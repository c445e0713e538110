"""The data stage: sources -> conversations -> chat-template rendering -> input_ids + loss masks.

Public API (everything else is internal):

    build_datasets(cfg, tokenizer, *, cache_dir=None) -> DataSplits(train, val, stats)
    write_stats(stats, run_dir) -> run_dir/data/stats.json
    render_prompt(tokenizer, messages) -> generation prompt ids (equal to the training prefix)
    preview(splits, tokenizer, n=3) -> text with label spans marked

Rows carry input_ids, assistant_masks (1 = label), messages (JSON), task, schema (JSON or ""),
target (last assistant reply) and origin ("file:line"). Hand them to trl's SFTTrainer as a
pre-tokenized dataset: trl builds `labels` from `assistant_masks` during its dataset preparation.

May import: errors, paths, files, distributed, config. It takes a tokenizer, never a model.
"""
from __future__ import annotations

from finetune.data.build import DataSplits, build_datasets
from finetune.data.preview import preview
from finetune.data.render import render_prompt
from finetune.data.stats import write_stats

__all__ = ["DataSplits", "build_datasets", "write_stats", "render_prompt", "preview"]
