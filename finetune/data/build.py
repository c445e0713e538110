"""build_datasets: sources -> conversations -> split -> rendered ids + loss masks -> cached splits."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.data import cache
from finetune.data.formats import CHAT_ADAPTERS, Example
from finetune.data.length import fit_length
from finetune.data.render import Encoded, special_tokens
from finetune.data.sources import RowError, read_records
from finetune.data.structured import StructuredBuilder
from finetune.data.stats import RowCounter, split_stats, summary_line
from finetune.errors import ConfigError, DataError
from finetune.config.data import DataConfig, SourceConfig, StructuredConfig

log = logging.getLogger("finetune.data")

SKIP_HINT = "set data.on_error=skip to drop bad rows instead (they are counted in data/stats.json)"


@dataclass
class DataSplits:
    """Tokenized train/val splits and what it took to make them (see stats.py)."""

    train: Any  # datasets.Dataset
    val: Any    # datasets.Dataset
    stats: dict


@dataclass
class _Row:
    example: Example
    enc: Encoded


def make_adapter(src: SourceConfig, structured: StructuredConfig) -> Callable[[dict], Example]:
    """The row -> Example function for one source."""
    cols = dict(src.columns or {})
    if src.format == "structured":
        return StructuredBuilder(src, structured).build
    adapter = CHAT_ADAPTERS[src.format]
    return lambda row: adapter(row, cols)


def _features():
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")), "assistant_masks": List(Value("int8")),
        "messages": Value("string"), "task": Value("string"), "schema": Value("string"),
        "target": Value("string"), "origin": Value("string"),
    })


def _bad_row(cfg: DataConfig, counter: RowCounter, source: int, origin: str, err: RowError) -> None:
    if cfg.on_error == "raise":
        raise DataError(f"{origin}: {err} [{err.reason}]; {SKIP_HINT}")
    counter.drop(source, err.reason, origin, str(err))


def _collect(cfg: DataConfig, counter: RowCounter) -> Iterator[Example]:
    """Every good conversation of every source, in file order; bad rows raise or are counted."""
    for i, src in enumerate(cfg.sources):
        adapter = make_adapter(src, cfg.structured)
        good = 0
        for rec in read_records(src.path, src.hub_split):
            if src.max_samples is not None and good >= src.max_samples:
                break  # max_samples keeps the first N good rows: a quick subset never reads the rest
            counter.read[i] += 1
            try:
                if rec.error is not None:
                    raise rec.error
                ex = adapter(rec.data)
            except RowError as e:
                _bad_row(cfg, counter, i, rec.origin, e)
                continue
            ex.origin, ex.source = rec.origin, i
            good += 1
            yield ex


def _encode_all(cfg: DataConfig, tokenizer: Any, examples: Iterator[Example], counter: RowCounter) -> list[_Row]:
    specials = special_tokens(tokenizer)
    rows = []
    for ex in examples:
        try:
            msgs, enc, outcome = fit_length(tokenizer, ex.messages, max_length=cfg.max_length,
                                            too_long=cfg.too_long, train_on=cfg.train_on, specials=specials)
        except RowError as e:
            _bad_row(cfg, counter, ex.source, ex.origin, e)
            continue
        except DataError as e:
            raise DataError(f"{ex.origin}: {e}") from None
        if enc is None:
            counter.drop(ex.source, outcome, ex.origin,
                         f"longer than data.max_length={cfg.max_length} (data.too_long={cfg.too_long})")
            continue
        if outcome == "truncated":
            counter.truncated += 1
            ex.messages = msgs
        rows.append(_Row(ex, enc))
    return rows


def _weighted(rows: list[_Row], weight: float, rng: random.Random) -> list[_Row]:
    """Each row `int(weight)` times, plus a seeded sample for the fraction (0.5 keeps half)."""
    whole, frac = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(frac * len(rows)))


def _split(cfg: DataConfig, rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
    """Seeded, per-source: val sources -> val; train sources lose val_fraction to val, then get weighted."""
    train: list[_Row] = []
    val: list[_Row] = []
    for i, src in enumerate(cfg.sources):
        mine = [r for r in rows if r.example.source == i]
        if src.split == "val":
            val += mine
            continue
        rng = random.Random(cfg.seed * 1_000_003 + i)  # per source: adding a source keeps the others' split
        rng.shuffle(mine)
        n_val = round(len(mine) * cfg.val_fraction)
        if cfg.val_fraction > 0 and len(mine) > 1:
            n_val = min(max(n_val, 1), len(mine) - 1)
        val += mine[:n_val]
        train += _weighted(mine[n_val:], src.weight, rng)
    random.Random(cfg.seed).shuffle(train)
    return train, val


def _to_dataset(rows: list[_Row]) -> Any:
    import datasets

    cols: dict[str, list] = {k: [] for k in _features()}
    for r in rows:
        ex = r.example
        cols["input_ids"].append(r.enc.input_ids)
        cols["assistant_masks"].append(r.enc.assistant_masks)
        cols["messages"].append(json.dumps(ex.messages, ensure_ascii=False))
        cols["task"].append(ex.task)
        cols["schema"].append(ex.schema)
        cols["target"].append(ex.target)
        cols["origin"].append(ex.origin)
    return datasets.Dataset.from_dict(cols, features=_features())


def _make_stats(cfg: DataConfig, counter: RowCounter, kept: list[_Row], train: list[_Row],
                val: list[_Row]) -> dict:
    per_source = []
    for i, src in enumerate(cfg.sources):
        n_kept = sum(r.example.source == i for r in kept)
        per_source.append({"path": src.path, "format": src.format, "split": src.split,
                           "rows_read": counter.read[i], "rows_kept": n_kept,
                           "rows_dropped": dict(sorted(counter.dropped[i].items())),
                           "rows_in_train": sum(r.example.source == i for r in train)})
    t = split_stats([r.enc.input_ids for r in train], [r.enc.assistant_masks for r in train], cfg.max_length)
    v = split_stats([r.enc.input_ids for r in val], [r.enc.assistant_masks for r in val], cfg.max_length)
    return {
        "rows_read": sum(counter.read), "rows_kept": len(kept), "rows_dropped": counter.total_dropped(),
        "rows_truncated": counter.truncated, "label_tokens": t["label_tokens"] + v["label_tokens"],
        "max_length": cfg.max_length, "train_on": cfg.train_on, "train": t, "val": v, "sources": per_source,
    }


def build_datasets(cfg: DataConfig, tokenizer: Any, *, cache_dir: Path | None = None) -> DataSplits:
    """Read, convert, split, render and mask every source of `cfg` with `tokenizer`'s chat template.

    Args:
        cfg: the data config (sources, formats, masking and length policy).
        tokenizer: the model's tokenizer; its own chat template renders every row.
        cache_dir: where preprocessed splits are cached (default <FINETUNE_CACHE or ~/.cache/finetune>/data).
    Returns:
        DataSplits with train/val `datasets.Dataset`s (columns input_ids, assistant_masks, messages,
        task, schema, target, origin) and the stats dict.
    Raises:
        ConfigError for invalid settings; DataError for missing files, bad rows (on_error=raise),
        unusable chat templates, rows too long (too_long=raise), or no training rows left.
    """
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    key = cache.cache_key(cfg, tokenizer)  # hashing reads every file: also reports a missing one early
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    if cfg.cache:
        hit = cache.load(cache_dir, key)
        if hit is not None:
            train_ds, val_ds, stats = hit
            stats["cache"] = {"key": key, "hit": True}
            log.info(summary_line(stats))
            return DataSplits(train_ds, val_ds, stats)

    counter = RowCounter(len(cfg.sources))
    kept = _encode_all(cfg, tokenizer, _collect(cfg, counter), counter)
    train, val = _split(cfg, kept)
    stats = _make_stats(cfg, counter, kept, train, val)
    if not train:
        dropped = ", ".join(f"{k} {v}" for k, v in stats["rows_dropped"].items()) or "none"
        raise DataError(f"no training rows left: read {stats['rows_read']} rows, dropped {dropped}, "
                        f"{len(val)} went to val. Check data.sources (split: train), data.max_length="
                        f"{cfg.max_length} and data.val_fraction={cfg.val_fraction}")
    train_ds, val_ds = _to_dataset(train), _to_dataset(val)
    stats["cache"] = {"key": key, "hit": False}
    if cfg.cache:
        cache.save(cache_dir, key, train_ds, val_ds, stats)
        loaded = cache.load(cache_dir, key)  # serve the memory-mapped copy: same as every later run gets
        if loaded is not None:
            train_ds, val_ds = loaded[0], loaded[1]
    log.info(summary_line(stats))
    return DataSplits(train_ds, val_ds, stats)
