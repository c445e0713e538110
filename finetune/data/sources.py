"""Reading the raw records of one source: local files, folders of shards, bundled demo files, Hub ids.

Each record comes with its origin ("file.jsonl:17") so every later error can say where the row is.
JSON lines are parsed here, not by `datasets`, because a broken line must be reported with its line
number and skipped alone instead of failing the whole file.

Files as people have them: `.jsonl`, `.json`, `.csv`, `.parquet`, each optionally `.gz` (and `.zst` when
the `zstandard` module is installed); a folder of such shards (read in name order as one source); a
UTF-8 byte-order mark; LF, CRLF or CR-only line endings; a `.json` file that holds JSON Lines (read as
such, with a note). Refused with the file or row named: UTF-16 (named, with the iconv line that fixes
it), bytes that are not UTF-8, NaN / Infinity (not JSON, and a NaN target would train as the text
"NaN"), and lone UTF-16 surrogate escapes such as "\\ud800" (Python accepts them, tokenizers cannot).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from finetune.errors import DataError
from finetune.paths import DEMO_DATA_DIR

log = logging.getLogger("finetune.data")

DEMO_PREFIX = "demo:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED = (".gz", ".zst")
SPLIT_NAMES = ("train", "validation", "valid", "val", "test", "dev")


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


def _kind(path: Path) -> tuple[str, str]:
    """(data suffix, compression suffix): rows.jsonl.gz -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else ""
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


def _is_data_file(path: Path) -> bool:
    return path.is_file() and _kind(path)[0] in LOCAL_SUFFIXES


def shards(folder: Path) -> list[Path]:
    """The data files of a folder read as one source, in name order."""
    return sorted(p for p in folder.iterdir() if _is_data_file(p))


def _is_hub_layout(folder: Path, hub_split: str) -> bool:
    # A dataset repo (README card, data/ folder, or files named by split such as train.jsonl or
    # train-00000-of-00002.parquet) goes through datasets.load_dataset, which picks the split.
    if (folder / "README.md").is_file() or (folder / "data").is_dir():
        return True
    names = [p.name.lower() for p in shards(folder)]
    return any(n.startswith(s) for n in names for s in {hub_split.lower(), *SPLIT_NAMES})


def resolve_path(path: str, hub_split: str = "train") -> Path | None:
    """The local file or shard folder behind a source path, or None for a Hub id (or a dataset repo folder).

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
        if shards(local) and not _is_hub_layout(local, hub_split):
            return local
        return None  # a dataset folder: datasets.load_dataset reads it like a Hub repo
    if _kind(local)[0] in LOCAL_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found (looked in {Path.cwd()}); check data.sources[].path — "
                        "relative paths are relative to the directory you run from")
    return None


def fingerprint(path: str, hub_split: str) -> str:
    """Content hash of a source for the cache key: file bytes (every shard's), or the Hub dataset's own fingerprint."""
    local = resolve_path(path, hub_split)
    if local is not None:
        h = hashlib.sha256()
        for f_path in (shards(local) if local.is_dir() else [local]):
            h.update(f_path.name.encode())
            with open(f_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    return f"hub:{path}:{hub_split}:{_load_hub(path, hub_split)._fingerprint}"


def read_records(path: str, hub_split: str = "train") -> Iterator[Record]:
    """Yield every record of a source in file order (shards in name order)."""
    local = resolve_path(path, hub_split)
    if local is None:
        ds = _load_hub(path, hub_split)
        for i, row in enumerate(ds):
            yield Record(f"{path}[{hub_split}] row {i}", row)
        return
    for f_path in (shards(local) if local.is_dir() else [local]):
        shown = path if f_path == local else str(Path(path) / f_path.name)
        yield from _read_file(f_path, shown)


def _read_file(local: Path, shown: str) -> Iterator[Record]:
    suffix, _ = _kind(local)
    if suffix == ".jsonl":
        yield from _read_jsonl(local, shown)
    elif suffix == ".json":
        yield from _read_json(local, shown)
    elif suffix == ".csv":
        yield from _read_csv(local, shown)
    elif suffix == ".parquet":
        yield from _read_parquet(local, shown)
    else:
        raise DataError(f"{shown}: unknown file type {''.join(local.suffixes)!r}; use .jsonl, .json, .csv or "
                        ".parquet (optionally .gz or .zst compressed)")


def _open(local: Path, shown: str, text: bool = True) -> IO[bytes]:
    """The file's bytes, decompressed; UTF-16 text is refused here, before any row is parsed."""
    comp = _kind(local)[1]
    if comp == ".gz":
        f: IO[bytes] = gzip.open(local, "rb")
    elif comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{shown}: reading .zst files needs the zstandard package (pip install zstandard), "
                            f"or decompress it first: zstd -d {local.name}") from None
        f = zstandard.ZstdDecompressor().stream_reader(open(local, "rb"), closefd=True)
        f = io.BufferedReader(f)  # type: ignore[arg-type]
    else:
        f = open(local, "rb")
    try:
        head = f.peek(64)[:64] if hasattr(f, "peek") else b""
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        f.close()
        raise DataError(f"{shown}: cannot decompress ({e}); is it really {comp or 'uncompressed'}?") from None
    if text:
        _refuse_utf16(head, shown, local)
    return f


def _refuse_utf16(head: bytes, shown: str, local: Path) -> None:
    encoding = None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "UTF-16 " + ("little-endian" if head[:2] == b"\xff\xfe" else "big-endian")
    elif len(head) >= 8 and head[1::2].count(0) >= len(head) // 4:  # ASCII text as UTF-16LE: every 2nd byte 0
        encoding = "UTF-16 little-endian (no byte-order mark)"
    elif len(head) >= 8 and head[0::2].count(0) >= len(head) // 4:
        encoding = "UTF-16 big-endian (no byte-order mark)"
    if encoding:
        raise DataError(f"{shown}: the file is {encoding}, not UTF-8; re-encode it: "
                        f"`iconv -f utf-16 -t utf-8 {local.name} > fixed_{local.name}`")


class _NonFinite:
    """What NaN / Infinity parse to: found later by the row check, so the row (not the file) is refused."""


NON_FINITE = _NonFinite()


def _loads(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=lambda _: NON_FINITE)


def value_problem(value: Any, where: str = "") -> str:
    """Why a parsed row cannot be trained ("" if it can): NaN/Infinity, or a lone surrogate in a string."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if v is NON_FINITE or (isinstance(v, float) and v != v):
            return f"{at or 'the row'} is NaN or Infinity, which is not JSON; write null or a number"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"{at or 'a string'} holds a lone UTF-16 surrogate (\\u{ord(v[e.start]):04x}); it cannot "
                        "be tokenized: fix the escape (a pair such as \\ud83d\\ude00 is fine)")
        elif isinstance(v, dict):
            stack += [(x, f"{at}.{k}" if at else str(k)) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, f"{at}[{i}]") for i, x in enumerate(v)]
    return ""


def _suspicious(raw: bytes) -> bool:
    # The deep value check only runs where it can find something: NaN/Infinity literals, or \ud8xx-\udfxx
    # escapes (raw UTF-8 bytes cannot encode a surrogate; the decoder refuses those as not UTF-8).
    return b"NaN" in raw or b"Infinity" in raw or b"\\ud" in raw or b"\\uD" in raw


def _json_record(origin: str, raw: bytes) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(origin, None, RowError(
            "not_utf8", f"line is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); re-encode the "
                        "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"))
    try:
        data = _loads(line)
    except json.JSONDecodeError as e:
        return Record(origin, None, RowError(
            "bad_json", f"broken JSON at column {e.colno}: {e.msg}; each line must be one JSON object"))
    if not isinstance(data, dict):
        return Record(origin, None, RowError(
            "bad_json", f"line is a JSON {type(data).__name__}, expected an object {{...}}"))
    problem = value_problem(data) if _suspicious(raw) else ""
    if problem:
        reason = "lone_surrogate" if "surrogate" in problem else "non_finite"
        return Record(origin, None, RowError(reason, problem))
    return Record(origin, data)


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for LF, CRLF and CR-only endings; a leading byte-order mark is dropped."""
    lineno = 0
    for chunk in f:  # splits on LF only, so a CR-only file arrives as one chunk: split it again
        if lineno == 0 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        pieces = chunk.splitlines() if b"\r" in chunk else [chunk]
        for piece in pieces or [b""]:
            lineno += 1
            yield lineno, piece


def _read_jsonl(local: Path, shown: str) -> Iterator[Record]:
    with _open(local, shown) as f:
        for lineno, raw in _lines(f):
            if raw.strip():  # blank lines (e.g. a trailing newline) are not rows
                yield _json_record(f"{shown}:{lineno}", raw)


def _read_text(local: Path, shown: str) -> str:
    # A whole-file format cannot be parsed around a bad byte, so this is a file error, not a row error.
    with _open(local, shown) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{shown}:{line}: file is not UTF-8 (byte {data[e.start:e.start + 1]!r}); re-encode it, "
                        f"e.g. `iconv -f latin1 -t utf-8 {local.name} > fixed_{local.name}`") from None


def _read_json(local: Path, shown: str) -> Iterator[Record]:
    text = _read_text(local, shown)
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line: JSON Lines
            log.warning("%s holds JSON Lines (one object per line), not one JSON document; reading it as "
                        ".jsonl (rename it to .jsonl to silence this)", shown)
            yield from _read_jsonl(local, shown)
            return
        raise DataError(f"{shown}:{e.lineno}: broken JSON at column {e.colno}: {e.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{shown}: expected a JSON list of row objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{shown}: expected a JSON list of row objects, got {type(data).__name__}")
    check = "NaN" in text or "Infinity" in text or "\\ud" in text.lower()
    for i, row in enumerate(data):
        origin = f"{shown} row {i}"
        problem = value_problem(row) if check else ""
        if not isinstance(row, dict):
            yield Record(origin, None, RowError("bad_json", f"row is a JSON {type(row).__name__}, expected an object"))
        elif problem:
            yield Record(origin, None, RowError("lone_surrogate" if "surrogate" in problem else "non_finite", problem))
        else:
            yield Record(origin, row)


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

    if _kind(local)[1]:
        with _open(local, shown, text=False) as f:
            local = io.BytesIO(f.read())  # type: ignore[assignment]  (parquet needs random access)
    try:
        batches = pq.ParquetFile(local).iter_batches(batch_size=4096)  # streams: a large file is not read whole
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(f"{shown} row {i}", row)
                i += 1
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{shown}: cannot read parquet file: {e}") from None


def _load_hub(path: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(path, split=split)
    except Exception as e:  # network, auth, missing dataset: all need the same advice
        raise DataError(f"{path}: not a local file, and loading it as a Hub dataset (split {split!r}) failed: "
                        f"{type(e).__name__}: {e}. Check the path, or data.sources[].hub_split") from None
