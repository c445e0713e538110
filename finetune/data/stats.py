"""Counting what the data stage did (rows read / kept / dropped with reason, lengths, label tokens).

The stats dict is written to <run>/data/stats.json and summarized in one log line, so that a
dropped row is never silent: `rows_read + rows_from_turn_split == rows_kept + sum(rows_dropped.values())`
always holds (rows_from_turn_split: the extra rows made when a template that is not prefix-stable gets
one row per assistant turn; 0 for every other template). Bad rows, ignored fields (per field) and
duplicates are counted too.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger("finetune.data")

# At most this many skipped rows are logged one by one per reason; the rest only counted.
LOG_EXAMPLES_PER_REASON = 3


class RowCounter:
    """Per-source and total counts of rows read, kept, dropped (by reason), bad, ignored fields, duplicates."""

    def __init__(self, n_sources: int):
        self.read = [0] * n_sources
        self.dropped = [Counter() for _ in range(n_sources)]
        self.bad = [0] * n_sources                          # dropped for a RowError (not for length or overlap)
        self.first_bad: list[str] = [""] * n_sources        # "origin: message [reason]" of the first one
        self.unused = [Counter() for _ in range(n_sources)]  # field -> rows that had it
        self.duplicates = [0] * n_sources
        self.expanded = 0  # extra rows from one-row-per-turn expansion (templates that are not prefix-stable)
        self.truncated = 0
        self._logged: Counter = Counter()

    def drop(self, source: int, reason: str, origin: str, message: str, *, bad: bool = True) -> None:
        self.dropped[source][reason] += 1
        if bad:
            self.bad[source] += 1
            if not self.first_bad[source]:
                self.first_bad[source] = f"{origin}: {message} [{reason}]"
        self._logged[reason] += 1
        if self._logged[reason] <= LOG_EXAMPLES_PER_REASON:
            log.warning("skipped %s: %s (%s)", origin, message, reason)

    def total_dropped(self) -> dict[str, int]:
        total: Counter = Counter()
        for c in self.dropped:
            total.update(c)
        return dict(sorted(total.items()))


def length_histogram(lengths: list[int], max_length: int) -> dict[str, int]:
    """Counts of sequence lengths in power-of-two bins up to max_length: {"<=16": n, "<=32": n, ...}."""
    edges, e = [], 16
    while e < max_length:
        edges.append(e)
        e *= 2
    edges.append(max(max_length, max(lengths, default=0)))
    counts = {f"<={edge}": 0 for edge in edges}
    for n in lengths:
        edge = next(x for x in edges if n <= x)
        counts[f"<={edge}"] += 1
    return counts


def split_stats(input_ids: list[list[int]], masks: list[list[int]], max_length: int) -> dict[str, Any]:
    lengths = [len(x) for x in input_ids]
    labels = [sum(m) for m in masks]
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "label_tokens": sum(labels),
        "label_tokens_min": min(labels, default=0),
        "length_max": max(lengths, default=0),
        "length_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        "length_histogram": length_histogram(lengths, max_length),
    }


def summary_line(stats: dict[str, Any]) -> str:
    """One human line: what was read, kept, dropped and trained on."""
    dropped = ", ".join(f"{k} {v}" for k, v in stats["rows_dropped"].items()) or "none"
    tr, va = stats["train"], stats["val"]
    cache = stats.get("cache", {})
    extra = f"; {stats['duplicates']} duplicates" if stats.get("duplicates") else ""
    if stats.get("rows_from_turn_split"):
        extra += f"; {stats['rows_from_turn_split']} rows from one-row-per-turn"
    return (f"data: read {stats['rows_read']} rows from {len(stats['sources'])} source(s), kept {stats['rows_kept']} "
            f"(dropped: {dropped}; truncated {stats['rows_truncated']}{extra}); train {tr['rows']} rows, {tr['tokens']} "
            f"tokens, {tr['label_tokens']} label tokens; val {va['rows']} rows; "
            f"cache {'hit' if cache.get('hit') else 'miss'} {cache.get('key', '')}".rstrip())


def write_stats(stats: dict[str, Any], run_dir: Path) -> Path:
    """Write `stats` to run_dir/data/stats.json atomically (temp file + rename); returns the path."""
    out_dir = Path(run_dir) / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "stats.json"
    fd, tmp = tempfile.mkstemp(prefix=".stats.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
