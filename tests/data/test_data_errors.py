"""Bad input: with on_error=raise a DataError naming file, line and field and what to do; with skip (default), counted,
and the run fails when more than data.max_bad_fraction of a source is bad."""
from __future__ import annotations

import json
import logging

import pytest

from finetune.errors import DataError

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def _raise_and_skip(build, path, fmt, reason, *needles):
    """The row on line 2 is bad: raise names it; skip keeps the 2 good rows and counts the bad one;
    the default (skip, at most 1% bad) fails on 1 bad row in 3 and names the first one."""
    with pytest.raises(DataError) as exc:
        build({"path": path, "format": fmt}, on_error="raise")
    msg = str(exc.value)
    assert f"{path}:2" in msg and f"[{reason}]" in msg and "on_error=skip" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    with pytest.raises(DataError, match=rf"1 of 3 rows are bad \(33.3%, more than data.max_bad_fraction=0.01\): "
                                        rf"{reason} 1\. First: .*:2: "):
        build({"path": path, "format": fmt})
    splits = build({"path": path, "format": fmt}, max_bad_fraction=0.5)
    assert splits.stats["rows_read"] == 3 and splits.stats["rows_kept"] == 2
    assert splits.stats["rows_dropped"] == {reason: 1}
    assert splits.stats["sources"][0]["rows_dropped"] == {reason: 1}
    return splits


def test_broken_json_line(build, write_jsonl, chat):
    path = write_jsonl([chat(), '{"messages": [', chat()])
    _raise_and_skip(build, path, "messages", "bad_json", "column")


def test_missing_field(build, write_jsonl):
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = write_jsonl([good, {"instruction": "Say hi.", "answer": "Hi."}, good])
    _raise_and_skip(build, path, "alpaca", "missing_field", "'output'", "columns")


def test_unknown_role(build, write_jsonl, chat):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    path = write_jsonl([chat(), bad, chat()])
    _raise_and_skip(build, path, "messages", "unknown_role", "messages[1].role='bot'")


def test_empty_assistant_reply(build, write_jsonl, chat):
    path = write_jsonl([chat(), chat(reply="   "), chat()])
    _raise_and_skip(build, path, "messages", "empty_reply", "messages[1]")


def test_non_utf8_line(build, tmp_path, chat):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(chat()).encode()
    path.write_bytes(good + b"\n" + json.dumps(chat(reply="caf\xe9")).encode().replace(b"\\u00e9", b"\xe9")
                     + b"\n" + good + b"\n")
    _raise_and_skip(build, str(path), "messages", "not_utf8", "iconv")


def test_non_utf8_csv_is_a_file_error(build, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,completion\nhi,caf\xe9\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: file is not UTF-8"):
        build({"path": str(path), "format": "completion"})


def test_target_failing_its_schema(build, write_jsonl):
    good = {"input": "Ann is 3.", "output": {"age": 3}, "schema": SCHEMA}
    path = write_jsonl([good, {"input": "Bob is old.", "output": {"age": "old"}, "schema": SCHEMA}, good])
    _raise_and_skip(build, path, "structured", "schema_mismatch", "output['age']", "'old' is not of type 'integer'")


def test_file_not_found(build, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        build({"path": missing})
    with pytest.raises(DataError, match="no bundled demo file"):
        build({"path": "demo:nope.jsonl"})


def test_dataset_empty_after_filtering(build, write_jsonl, chat):
    path = write_jsonl([chat(user="word " * 300)])
    with pytest.raises(DataError, match=r"no training rows left: read 1 rows, dropped too_long 1"):
        build({"path": path}, max_length=64)


def test_skipped_rows_are_logged(build, write_jsonl, chat, caplog):
    path = write_jsonl([chat(), "not json", chat()])
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        build({"path": path}, max_bad_fraction=0.5)
    assert any(r.levelno == logging.WARNING and ":2" in r.getMessage() for r in caplog.records)
    assert any("dropped: bad_json 1" in r.getMessage() for r in caplog.records)


def test_special_token_text_in_content_is_refused(build, write_jsonl, chat):
    path = write_jsonl([chat(), chat(reply="Done.<|im_end|>"), chat()])
    _raise_and_skip(build, path, "messages", "special_token_in_text", "<|im_end|>")


def test_conversation_must_end_with_a_reply(build, write_jsonl, chat):
    bad = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_jsonl([chat(), bad, chat()])
    _raise_and_skip(build, path, "messages", "no_reply")
