"""Reading the raw records of one source: local jsonl/json/csv/parquet files, bundled demo files, Hub ids.

Each record comes with its origin ("file.jsonl:17") so every later error can say where the row is.
JSON lines are parsed here, not by `datasets`, because a broken line must be reported with its line
number and, with on_error=skip, skipped alone instead of failing the whole file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from finetune.errors import DataError
from finetune.paths import DEMO_DATA_DIR

DEMO_PREFIX = "demo:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class RowError(Exception):
    """One bad row: `reason` is a short key counted in stats.json, the message says what to do."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Record:
    origin: str                      # "path:line" or "hub-id[split] row N"
    data: dict | None                # the parsed row, or None when `error` is set
    error: RowError | None = None


def resolve_path(path: str) -> Path | None:
    """The local file behind a source path, or None for a Hub dataset id (or a dataset folder).

    `demo:<name>` is looked up beside the installed package (works from a wheel); other paths are
    relative to the current directory. A path that looks like a file but does not exist is an error,
    not a Hub id, so that typos are reported as such.
    """
    if path.startswith(DEMO_PREFIX):
        name = path[len(DEMO_PREFIX):]
        local = DEMO_DATA_DIR / name
        if not local.is_file():
            have = ", ".join(sorted(p.name for p in DEMO_DATA_DIR.glob("*.jsonl")))
            raise DataError(f"{path}: no bundled demo file {name!r}; available: {have}")
        return local
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        return None  # a dataset folder: datasets.load_dataset reads it like a Hub repo
    if local.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found (looked in {Path.cwd()}); check data.sources[].path — "
                        "relative paths are relative to the directory you run from")
    return None


def fingerprint(path: str, hub_split: str) -> str:
    """Content hash of a source for the cache key: file bytes, or the Hub dataset's own fingerprint."""
    local = resolve_path(path)
    if local is not None:
        h = hashlib.sha256()
        with open(local, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return f"hub:{path}:{hub_split}:{_load_hub(path, hub_split)._fingerprint}"


def read_records(path: str, hub_split: str = "train") -> Iterator[Record]:
    """Yield every record of a source in file order."""
    local = resolve_path(path)
    if local is None:
        ds = _load_hub(path, hub_split)
        for i, row in enumerate(ds):
            yield Record(f"{path}[{hub_split}] row {i}", row)
        return
    suffix = local.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(local, path)
    elif suffix == ".json":
        yield from _read_json(local, path)
    elif suffix == ".csv":
        yield from _read_csv(local, path)
    elif suffix == ".parquet":
        yield from _read_parquet(local, path)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _read_jsonl(local: Path, shown: str) -> Iterator[Record]:
    with open(local, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            origin = f"{shown}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(origin, None, RowError(
                    "not_utf8", f"line is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); re-encode the "
                                "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"))
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(origin, None, RowError(
                    "bad_json", f"broken JSON at column {e.colno}: {e.msg}; each line must be one JSON object"))
                continue
            if not isinstance(data, dict):
                yield Record(origin, None, RowError(
                    "bad_json", f"line is a JSON {type(data).__name__}, expected an object {{...}}"))
                continue
            yield Record(origin, data)


def _read_text(local: Path, shown: str) -> str:
    # A whole-file format cannot be parsed around a bad byte, so this is a file error, not a row error.
    data = local.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}: file is not UTF-8 (byte {data[e.start:e.start + 1]!r}); re-encode it, "
                        f"e.g. `iconv -f latin1 -t utf-8 {local.name} > fixed{local.suffix}`") from None


def _read_json(local: Path, shown: str) -> Iterator[Record]:
    try:
        data = json.loads(_read_text(local, shown))
    except json.JSONDecodeError as e:
        raise DataError(f"{shown}:{e.lineno}: broken JSON at column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{shown}: expected a JSON list of row objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{shown}: expected a JSON list of row objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        origin = f"{shown} row {i}"
        if isinstance(row, dict):
            yield Record(origin, row)
        else:
            yield Record(origin, None, RowError("bad_json", f"row is a JSON {type(row).__name__}, expected an object"))


def _read_csv(local: Path, shown: str) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(local, shown), newline=""))
    for row in reader:
        origin = f"{shown}:{reader.line_num}"
        if None in row:
            yield Record(origin, None, RowError("bad_csv", "row has more cells than the header has columns"))
            continue
        yield Record(origin, dict(row))


def _read_parquet(local: Path, shown: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(local)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{shown}: cannot read parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield Record(f"{shown} row {i}", row)


def _load_hub(path: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # network, auth, missing dataset: all need the same advice
        raise DataError(f"{path}: not a local file, and loading it as a Hub dataset (split {split!r}) failed: "
                        f"{type(e).__name__}: {e}. Check the path, or data.sources[].hub_split") from None
