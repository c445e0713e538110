"""Prompts for generation: a jsonl prompts file, or the held-out conversations of the run's data.

One place for what merge (parity), export (verification) and `finetune generate` all need: a list of
conversations that end before the reply the model is to write.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune.errors import DataError, FinetuneError


@dataclass
class PromptRow:
    messages: list[dict]
    schema: Optional[dict] = None  # JSON schema for constrain=json_schema
    extra: dict = field(default_factory=dict)  # other fields of the input row (ids, ...), copied to the output
    origin: str = ""  # file:line


def _parse_row(row: Any, where: str) -> PromptRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages' (list) or 'prompt' (string)")
    if isinstance(row.get("prompt"), str):
        messages = [{"role": "user", "content": row["prompt"]}]
    elif isinstance(row.get("messages"), list) and row["messages"]:
        messages = row["messages"]
        for k, msg in enumerate(messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise DataError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    else:
        raise DataError(f"{where}: expected 'messages' (a non-empty list) or 'prompt' (a string)")
    schema = row.get("schema")
    if isinstance(schema, str) and schema.strip():
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise DataError(f"{where}: 'schema' is a string but not JSON ({e.msg})") from None
    if schema is not None and not isinstance(schema, dict):
        schema = None if schema == "" else schema
        if schema is not None:
            raise DataError(f"{where}: 'schema' must be a JSON Schema object")
    extra = {k: v for k, v in row.items() if k not in ("messages", "prompt", "schema")}
    return PromptRow(messages, schema, extra, where)


def read_prompts(path: Path, *, key: str = "generate.prompts") -> list[PromptRow]:
    """Rows of a jsonl file of {"messages": [...]} or {"prompt": "..."} (optional "schema", other fields kept).

    Args:
        key: the config key that named the file, for the error messages (merge.prompts, export.prompts, ...).
    Raises:
        DataError listing every bad line (file:line and what is wrong), so one run fixes them all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{key}={str(path)!r}: {path}:{line} is not UTF-8 ({e.reason}, byte {e.start}); re-save the "
                        "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as e:
        raise DataError(f"{key}={str(path)!r}: cannot read it ({e.strerror}); check its permissions") from None
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_row(json.loads(line), f"{path}:{n}"))
        except ValueError as e:  # DataError is not a ValueError; this is JSON
            bad.append(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})")
        except DataError as e:
            bad.append(str(e))
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad line(s) in the prompts file ({key}); fix or remove them:\n  "
                        + "\n  ".join(bad[:10]) + more)
    if not rows:
        raise DataError(f"{key}={str(path)!r}: no prompts (the file is empty)")
    return rows


def held_out_prompts(data_cfg, tokenizer, limit: Optional[int] = None, *,
                     train_fallback: bool = False) -> tuple[list[PromptRow], str]:
    """The validation split's conversations without their last (assistant) reply, with schema, origin and
    target; and where they came from ("val split").

    Args:
        limit: at most this many rows (the first ones), None for all.
        train_fallback: with no validation rows, take the train split's instead (a parity or export check
            on seen rows still catches a broken artifact); otherwise the list is empty.
    """
    from finetune.data import build_datasets

    splits = build_datasets(data_cfg, tokenizer)
    rows, source = (splits.val if splits.val is not None else []), "val split"
    if train_fallback and not len(rows):
        rows, source = splits.train, "train split (no val rows)"
    n = len(rows) if limit is None else min(limit, len(rows))
    out = []
    for i in range(n):
        r = rows[i]
        schema = r.get("schema")
        out.append(PromptRow(json.loads(r["messages"])[:-1], json.loads(schema) if schema else None,
                             {"origin": r.get("origin"), "target": r.get("target")}, r.get("origin") or ""))
    return out, source


def check_conversations(path: Optional[str], key: str, data_cfg, tokenizer, limit: int,
                        *, have_data: bool = True) -> tuple[list[list[dict]], str]:
    """Up to `limit` conversations to check an artifact on (merge parity, export verification): the prompts
    file `path` when set (config key `key`), else the held-out rows (the train split's when there are none).

    Args:
        have_data: False when there is no run whose data could be read (export with export.model only).
    Raises:
        DataError: the prompts file is missing or has bad lines.
        FinetuneError: no prompts file and no run data.
    """
    if path:
        return [r.messages for r in read_prompts(Path(path), key=key)][:limit], path
    if not have_data:
        raise FinetuneError(f"no prompts to check on: pass {key}=<jsonl file> or run=<run dir>")
    rows, source = held_out_prompts(data_cfg, tokenizer, limit, train_fallback=True)
    return [r.messages for r in rows], source
