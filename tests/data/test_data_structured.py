"""Structured-output rows: prompt template, canonical targets, schema validation, per-source schemas, tables."""
from __future__ import annotations

import json

import pytest

from finetune.data.structured import parse_table, render_table, serialize, sketch
from finetune.errors import DataError
from finetune.config.data import StructuredConfig

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "object", "properties": {
                                               "k": {"type": "string"}, "v": {"type": "integer"}}}}}}
VALUE = {"tags": [{"v": 1, "k": "x"}], "age": 3, "name": "Ann"}


def test_key_orders_and_indent():
    assert serialize(VALUE, SCHEMA, "schema", None) == '{"name":"Ann","age":3,"tags":[{"k":"x","v":1}]}'
    assert serialize(VALUE, SCHEMA, "sorted", None) == '{"age":3,"name":"Ann","tags":[{"k":"x","v":1}]}'
    assert serialize(VALUE, SCHEMA, "given", None) == '{"tags":[{"v":1,"k":"x"}],"age":3,"name":"Ann"}'
    assert serialize({"b": 1, "a": 2}, {}, "schema", 2) == '{\n  "b": 1,\n  "a": 2\n}'


def test_row_becomes_prompt_with_schema_and_canonical_target(build, write_jsonl):
    path = write_jsonl([{"input": "Ann {3}", "output": json.dumps(VALUE), "schema": json.dumps(SCHEMA)}])
    row = build({"path": path, "format": "structured"},
                structured=StructuredConfig(prompt_template="{instruction} | {schema} | {input} {x}",
                                            instruction="Do it.", system="JSON only.")).train[0]
    msgs = json.loads(row["messages"])
    assert msgs[0] == {"role": "system", "content": "JSON only."}
    assert msgs[1]["content"] == f"Do it. | {json.dumps(SCHEMA, separators=(',', ':'))} | Ann {{3}} {{x}}"
    assert row["target"] == msgs[2]["content"] == '{"name":"Ann","age":3,"tags":[{"k":"x","v":1}]}'
    assert json.loads(row["schema"]) == SCHEMA and row["task"] == "structured"


def test_sketch_shows_keys_types_enums_and_optional_keys():
    schema = {"type": "object", "required": ["id", "items", "cur", "when"], "properties": {
        "id": {"type": "string", "maxLength": 12}, "note": {"type": ["string", "null"]},
        "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["q"],
                                                            "properties": {"q": {"type": "integer"}}}},
        "cur": {"enum": ["EUR", None]}, "when": {"type": "string", "format": "date"},
        "kind": {"const": "a"}, "any": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
        "ref": {"$ref": "#/defs/x"}}}
    assert sketch(schema) == ('{"id":string,"note"?:string|null,"items":[{"q":integer}],"cur":"EUR"|null,'
                              '"when":string<date>,"kind"?:"a","any"?:integer|boolean,"ref"?:{"$ref":"#/defs/x"}}')


def test_schema_format_sketch_goes_into_the_prompt_and_the_row_keeps_the_full_schema(build, write_jsonl):
    path = write_jsonl([{"input": "Ann", "output": {"name": "Ann", "age": 3, "tags": []}, "schema": SCHEMA}])
    row = build({"path": path, "format": "structured"},
                structured=StructuredConfig(prompt_template="{schema}|{input}", schema_format="sketch")).train[0]
    msgs = json.loads(row["messages"])
    assert msgs[0]["content"] == '{"name"?:string,"age"?:integer,"tags"?:[{"k"?:string,"v"?:integer}]}|Ann'
    assert json.loads(row["schema"]) == SCHEMA  # eval validates against the full schema


def test_source_schema_inline_or_file(build, write_jsonl, tmp_path):
    path = write_jsonl([{"text": "Ann is 3", "out": {"age": 3}}])
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for given in (schema, str(tmp_path / "s.json")):
        row = build({"path": path, "format": "structured", "schema": given,
                     "columns": {"input": "text", "output": "out"}}).train[0]
        assert json.loads(row["schema"]) == schema and row["target"] == '{"age":3}'


def test_missing_schema_is_an_error(build, write_jsonl):
    with pytest.raises(DataError, match="no 'schema' field and the source has none"):
        build({"path": write_jsonl([{"input": "x", "output": {}}]), "format": "structured"})


def test_invalid_schema_is_an_error(build, write_jsonl):
    with pytest.raises(DataError, match=r"\[bad_schema\]"):
        build({"path": write_jsonl([{"input": "x", "output": 1, "schema": {"type": "nope"}}]), "format": "structured"})


TABLE_COLS = ["name", "age"]


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
def test_table_targets_render_canonically(build, write_jsonl, fmt):
    rows = [{"input": "Ann 3, Bob 4", "output": [{"name": "Ann", "age": 3}, {"age": 4, "name": "Bob"}]},
            {"input": "Cy 5", "output": [["Cy", "5"]]},
            {"input": "Di 6", "output": render_table(TABLE_COLS, [["Di", "6"]], fmt)}]
    splits = build({"path": write_jsonl(rows), "format": "structured", "table_columns": TABLE_COLS},
                   structured=StructuredConfig(table_format=fmt))
    targets = sorted(splits.train["target"])
    expected = sorted(render_table(TABLE_COLS, r, fmt) for r in ([["Ann", "3"], ["Bob", "4"]], [["Cy", "5"]],
                                                                 [["Di", "6"]]))
    assert targets == expected
    assert set(splits.train["task"]) == {"table"}
    assert "columns name, age" in json.loads(splits.train[0]["messages"])[0]["content"]
    assert parse_table(expected[0], fmt)[0] == TABLE_COLS


def test_markdown_table_escapes_pipes():
    text = render_table(["a"], [["x|y"]], "markdown")
    assert text == "| a |\n|---|\n| x\\|y |" and parse_table(text, "markdown") == [["a"], ["x|y"]]


@pytest.mark.parametrize("bad", [[{"name": "Ann"}], [["Ann", "3", "extra"]], "| who | age |\n|---|---|\n| A | 1 |"])
def test_table_not_matching_declared_columns(build, write_jsonl, bad):
    path = write_jsonl([{"input": "x", "output": bad}])
    with pytest.raises(DataError, match=r"\[table_mismatch\]"):
        build({"path": path, "format": "structured", "table_columns": TABLE_COLS})
