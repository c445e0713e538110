"""build_datasets: sources -> conversations -> template check -> rendered ids + loss masks -> split -> cache.

Bad rows (data.on_error=skip, the default) are dropped, counted by reason and the first few logged
with file:line; more than data.max_bad_fraction of one source's rows bad fails the run, because that
is a wrong format or columns setting rather than a few broken rows. Exact duplicates are counted and
all copies of a conversation stay on one side of the train/val split.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.data import cache
from finetune.data.formats import CHAT_ADAPTERS, Example
from finetune.data.length import fit_length
from finetune.data.parallel import map_rows
from finetune.data.render import FEATURE_NAMES, Encoded, NotPrefixStable, special_tokens, template_support
from finetune.data.sources import RowError, read_records
from finetune.data.stats import RowCounter, split_stats, summary_line
from finetune.data.structured import StructuredBuilder, compact
from finetune.data.tools import call_schema, load_source_tools
from finetune.errors import ConfigError, DataError
from finetune.config.data import DataConfig, SourceConfig, StructuredConfig

log = logging.getLogger("finetune.data")

SKIP_HINT = "set data.on_error=skip to drop bad rows instead (they are counted in data/stats.json)"
LENGTH_DROPS = ("too_long", "reply_too_long", "duplicate_of_val")  # policy drops, not bad rows


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
    group: str  # content hash of the conversation it came from: duplicates and per-turn rows share it


def make_adapter(src: SourceConfig, structured: StructuredConfig, where: str = "data.sources[]"
                 ) -> Callable[[dict], Example]:
    """The row -> Example function for one source."""
    cols = dict(src.columns or {})
    if src.format == "structured":
        return StructuredBuilder(src, structured, where).build
    adapter = CHAT_ADAPTERS[src.format]
    tools = load_source_tools(src.tools, f"{where}.tools") if src.tools is not None else None
    return lambda row: adapter(row, cols, tools)


def _features():
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")), "assistant_masks": List(Value("int8")),
        "messages": Value("string"), "task": Value("string"), "schema": Value("string"),
        "target": Value("string"), "origin": Value("string"), "tools": Value("string"),
    })


def _bad_row(cfg: DataConfig, counter: RowCounter, source: int, origin: str, err: RowError) -> None:
    if cfg.on_error == "raise":
        raise DataError(f"{origin}: {err} [{err.reason}]; {SKIP_HINT}")
    counter.drop(source, err.reason, origin, str(err))


def _check_bad_fraction(cfg: DataConfig, counter: RowCounter) -> None:
    for i, src in enumerate(cfg.sources):
        read, bad = counter.read[i], counter.bad[i]
        if read and bad / read > cfg.max_bad_fraction:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(counter.dropped[i].items()) if k not in LENGTH_DROPS)
            raise DataError(
                f"data.sources[{i}] ({src.path}, format {src.format}): {bad} of {read} rows are bad "
                f"({100 * bad / read:.1f}%, more than data.max_bad_fraction={cfg.max_bad_fraction}): {reasons}. "
                f"First: {counter.first_bad[i]}. Check the source's format and columns, fix the rows, or raise "
                "data.max_bad_fraction")


def _collect(cfg: DataConfig, counter: RowCounter) -> list[Example]:
    """Every good conversation of every source, in file order; bad rows raise or are counted."""
    out = []
    for i, src in enumerate(cfg.sources):
        adapter = make_adapter(src, cfg.structured, f"data.sources[{i}]")
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
            counter.unused[i].update(set(ex.ignored))
            good += 1
            out.append(ex)
    return out


def _check_template(tokenizer: Any, examples: list[Example], counter: RowCounter) -> dict[str, bool]:
    """Refuse once, before any row is rendered, data the template cannot render (tools, reasoning, ...)."""
    used: dict[str, list] = {}
    for ex in examples:
        for f in ex.features():
            used.setdefault(f, [0, ex.origin])[0] += 1
    if not used:
        return {}
    support = template_support(tokenizer)
    missing = [f for f in FEATURE_NAMES if f in used and not support[f] and f != "names"]
    if missing:
        what = "; ".join(f"{FEATURE_NAMES[f]}: {used[f][0]} rows (first {used[f][1]})" for f in missing)
        raise DataError(f"the chat template of this tokenizer cannot render {what}. Its output would silently "
                        "lose them. Use a model whose template renders them (Qwen2.5-Instruct renders tools; "
                        "Qwen3 and DeepSeek-R1 render reasoning), or set model.chat_template to one that does")
    if "names" in used and not support["names"]:
        for ex in examples:  # kept in the stored messages, but the model never sees them: say so
            if "names" in ex.features():
                counter.unused[ex.source]["messages[].name (not rendered by the chat template)"] += 1
    return support


def _group(ex: Example) -> str:
    return hashlib.sha1(json.dumps([ex.messages, ex.tools], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _encode_example(state: tuple, ex: Example) -> tuple:
    """Worker: ("ok", [(example, encoded | None, outcome)]) | ("row", reason, message) | ("data", message)."""
    tokenizer, cfg, specials = state
    try:
        return "ok", _encode_rows(tokenizer, cfg, specials, ex)
    except RowError as e:
        return "row", e.reason, str(e)
    except DataError as e:
        return "data", str(e)


def _encode_rows(tokenizer: Any, cfg: DataConfig, specials: Any, ex: Example) -> list[tuple]:
    def fit(msgs: list[dict], train_on: str, last_only: bool = False) -> tuple:
        used, enc, outcome = fit_length(tokenizer, msgs, max_length=cfg.max_length, too_long=cfg.too_long,
                                        train_on=train_on, specials=specials, tools=ex.tools,
                                        train_on_reasoning=cfg.train_on_reasoning, last_only=last_only)
        return _finish(dataclasses.replace(ex, messages=used), enc), enc, outcome

    try:
        return [fit(ex.messages, cfg.train_on)]
    except NotPrefixStable:
        pass
    # The template rewrites earlier turns (past reasoning stripped): one row per trained assistant turn,
    # each the prefix ending at that turn, rendered exactly as inference renders it; only its last reply
    # is labelled (earlier ones appear as the template shows them in history).
    turns = [k for k, m in enumerate(ex.messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    if cfg.train_on == "last_assistant":
        turns = turns[-1:] if turns and turns[-1] == len(ex.messages) - 1 else []
    train_on = "everything" if cfg.train_on == "everything" else "last_assistant"
    return [fit(ex.messages[:k + 1], train_on, last_only=True) for k in turns]


def _finish(ex: Example, enc: Encoded | None) -> Example:
    last = ex.messages[-1]
    if last.get("tool_calls") and ex.tools:
        # Eval scores the call (metrics.score_row) and constrained decoding enforces its schema.
        ex.task, ex.schema = "tool_call", compact(call_schema(ex.tools))
    ex.target_text = enc.target if enc is not None and ex.task == "tool_call" else last["content"]
    return ex


def _encode_all(cfg: DataConfig, tokenizer: Any, examples: list[Example], counter: RowCounter) -> list[_Row]:
    state = (tokenizer, cfg, special_tokens(tokenizer))
    rows = []
    for ex, result in zip(examples, map_rows(_encode_example, state, examples, num_proc=cfg.num_proc)):
        if result[0] == "row":
            _bad_row(cfg, counter, ex.source, ex.origin, RowError(result[1], result[2]))
            continue
        if result[0] == "data":
            raise DataError(f"{ex.origin}: {result[1]}")
        group = _group(ex)
        counter.expanded += max(0, len(result[1]) - 1)
        for sub, enc, outcome in result[1]:
            if enc is None:
                counter.drop(ex.source, outcome, ex.origin,
                             f"longer than data.max_length={cfg.max_length} (data.too_long={cfg.too_long})", bad=False)
                continue
            if outcome == "truncated":
                counter.truncated += 1
            rows.append(_Row(sub, enc, group))
    return rows


def _weighted(rows: list[_Row], weight: float, rng: random.Random) -> list[_Row]:
    """Each row `int(weight)` times, plus a seeded sample for the fraction (0.5 keeps half)."""
    whole, frac = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(frac * len(rows)))


def _hold_out(mine: list[_Row], fraction: float, rng: random.Random) -> tuple[list[_Row], list[_Row]]:
    """Seeded val share of one source, by conversation group: copies never straddle the split."""
    groups: dict[str, list[_Row]] = {}
    for r in mine:
        groups.setdefault(r.group, []).append(r)
    keys = list(groups)
    rng.shuffle(keys)
    n_val = round(len(mine) * fraction)
    if fraction > 0 and len(keys) > 1:
        n_val = max(n_val, 1)
    val: list[_Row] = []
    taken = 0
    for k in keys[:-1] if fraction > 0 else []:  # at least one group stays in train
        if taken >= n_val:
            break
        val += groups[k]
        taken += len(groups[k])
    chosen = {r.group for r in val}
    return [r for r in mine if r.group not in chosen], val


def _split(cfg: DataConfig, rows: list[_Row], counter: RowCounter) -> tuple[list[_Row], list[_Row]]:
    """Seeded, per-source: val sources -> val; train sources lose val_fraction to val, then get weighted.

    A train row whose conversation is also in val is dropped ("duplicate_of_val"): it would score the
    model on what it trained on.
    """
    per_source: list[list[_Row]] = []
    val: list[_Row] = []
    for i, src in enumerate(cfg.sources):
        mine = [r for r in rows if r.example.source == i]
        if src.split == "val":
            val += mine
            per_source.append([])
            continue
        rng = random.Random(cfg.seed * 1_000_003 + i)  # per source: adding a source keeps the others' split
        rng.shuffle(mine)
        keep, held = _hold_out(mine, cfg.val_fraction, rng)
        val += held
        per_source.append(keep)
    in_val = {r.group for r in val}
    train: list[_Row] = []
    for i, src in enumerate(cfg.sources):
        keep = []
        for r in per_source[i]:
            if r.group in in_val and not cfg.allow_val_overlap:
                counter.drop(i, "duplicate_of_val", r.example.origin, "the same conversation is in the val split",
                             bad=False)
            else:
                keep.append(r)
        train += _weighted(keep, src.weight, random.Random(cfg.seed * 1_000_003 + i + 7))
    random.Random(cfg.seed).shuffle(train)
    return train, val


def _count_duplicates(examples: list[Example], counter: RowCounter) -> None:
    """Count rows whose conversation (messages + tools) already occurred, in any source."""
    seen: set[str] = set()
    for ex in examples:
        key = _group(ex)
        if key in seen:
            counter.duplicates[ex.source] += 1
        seen.add(key)


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
        cols["target"].append(ex.target_text if ex.target_text is not None else ex.target)
        cols["origin"].append(ex.origin)
        cols["tools"].append(json.dumps(ex.tools, ensure_ascii=False) if ex.tools else "")
    return datasets.Dataset.from_dict(cols, features=_features())


def _make_stats(cfg: DataConfig, counter: RowCounter, kept: list[_Row], train: list[_Row],
                val: list[_Row]) -> dict:
    per_source = []
    for i, src in enumerate(cfg.sources):
        n_kept = sum(r.example.source == i for r in kept) - counter.dropped[i]["duplicate_of_val"]
        per_source.append({"path": src.path, "format": src.format, "split": src.split,
                           "rows_read": counter.read[i], "rows_kept": n_kept,
                           "rows_dropped": dict(sorted(counter.dropped[i].items())),
                           "rows_bad": counter.bad[i], "duplicates": counter.duplicates[i],
                           "unused_fields": dict(sorted(counter.unused[i].items())),
                           "rows_in_train": sum(r.example.source == i for r in train)})
    t = split_stats([r.enc.input_ids for r in train], [r.enc.assistant_masks for r in train], cfg.max_length)
    v = split_stats([r.enc.input_ids for r in val], [r.enc.assistant_masks for r in val], cfg.max_length)
    unused: dict[str, int] = {}
    for c in counter.unused:
        for k, n in c.items():
            unused[k] = unused.get(k, 0) + n
    tasks: dict[str, int] = {}
    for r in kept:
        tasks[r.example.task] = tasks.get(r.example.task, 0) + 1
    return {
        "rows_read": sum(counter.read), "rows_kept": sum(s["rows_kept"] for s in per_source), "rows_dropped": counter.total_dropped(),
        "rows_bad": sum(counter.bad), "rows_truncated": counter.truncated, "rows_from_turn_split": counter.expanded,
        "duplicates": sum(counter.duplicates), "unused_fields": dict(sorted(unused.items())),
        "tasks": dict(sorted(tasks.items())), "label_tokens": t["label_tokens"] + v["label_tokens"],
        "max_length": cfg.max_length, "train_on": cfg.train_on, "train": t, "val": v, "sources": per_source,
    }


def _warn_unused(cfg: DataConfig, counter: RowCounter) -> None:
    """One warning naming every field that was read but not used, with how many rows had it."""
    parts = []
    for i, c in enumerate(counter.unused):
        if c:
            fields = ", ".join(f"{k} ({n} rows)" for k, n in c.most_common())
            parts.append(f"data.sources[{i}] ({cfg.sources[i].path}, format {cfg.sources[i].format}): {fields}")
    if parts:
        log.warning("data: fields not used by the chosen format were ignored (counted in data/stats.json "
                    "unused_fields; map one with data.sources[].columns if it matters): %s", "; ".join(parts))


def build_datasets(cfg: DataConfig, tokenizer: Any, *, cache_dir: Path | None = None) -> DataSplits:
    """Read, convert, split, render and mask every source of `cfg` with `tokenizer`'s chat template.

    Args:
        cfg: the data config (sources, formats, masking and length policy).
        tokenizer: the model's tokenizer; its own chat template renders every row.
        cache_dir: where preprocessed splits are cached (default <FINETUNE_CACHE or ~/.cache/finetune>/data).
    Returns:
        DataSplits with train/val `datasets.Dataset`s (columns input_ids, assistant_masks, messages,
        task, schema, target, origin, tools) and the stats dict.
    Raises:
        ConfigError for invalid settings; DataError for missing files, bad rows (on_error=raise, or more
        than max_bad_fraction of a source), templates that cannot render the data, rows too long
        (too_long=raise), or no training rows left.
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
    examples = _collect(cfg, counter)
    _check_bad_fraction(cfg, counter)  # a wrong format drops most rows: say so before the slow part
    _check_template(tokenizer, examples, counter)
    _count_duplicates(examples, counter)
    kept = _encode_all(cfg, tokenizer, examples, counter)
    _check_bad_fraction(cfg, counter)
    train, val = _split(cfg, kept, counter)
    _warn_unused(cfg, counter)
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
