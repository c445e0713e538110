"""Prompt files for `finetune generate`: messages or plain prompts; broken lines named by file:line (item 7)."""
import json

import pytest

from tests.support import run_cli
from finetune.errors import DataError
from finetune.generate.generation import read_prompts


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_messages_and_plain_prompts_with_schema_and_extra_fields(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rows = read_prompts(write(tmp_path / "p.jsonl", [
        {"id": 7, "prompt": "Hi"},
        "",  # blank lines are skipped
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "schema": schema},
        {"prompt": "J", "schema": json.dumps(schema)},  # a schema may also be JSON text, as in the data files
    ]))
    assert [r.messages for r in rows] == [[{"role": "user", "content": "Hi"}],
                                          [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                          [{"role": "user", "content": "J"}]]
    assert rows[0].extra == {"id": 7} and rows[0].schema is None and rows[0].origin.endswith("p.jsonl:1")
    assert rows[1].schema == schema and rows[2].schema == schema


def test_every_broken_line_is_reported_with_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"prompt": "fine"},
        '{"prompt": "unterminated',
        {"messages": [{"role": "user"}]},
        {"text": "no prompt field"},
        ["not", "an", "object"],
        {"prompt": "x", "schema": "{not json"},
    ])
    with pytest.raises(DataError) as err:
        read_prompts(path)
    msg = str(err.value)
    assert msg.startswith("5 bad line(s)")
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: messages[0] must be an object with string 'role' and 'content'" in msg
    assert f"{path}:4: expected 'messages'" in msg and f"{path}:5: expected a JSON object" in msg
    assert f"{path}:6: 'schema' is a string but not JSON" in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="generate.prompts=.*nope.jsonl.*file not found"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        read_prompts(write(tmp_path / "empty.jsonl", [""]))


def test_cli_reports_a_broken_prompt_file_before_loading_any_model(tmp_path):
    path = write(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', "{oops"])
    res = run_cli("generate", f"generate.model={tmp_path / 'not-loaded'}", f"generate.prompts={path}",
                  f"hydra.run.dir={tmp_path / 'log'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{path}:2: not valid JSON" in res.stderr and "not-loaded" not in res.stderr
