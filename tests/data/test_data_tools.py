"""Tool calling through the data stage: OpenAI and ShareGPT tool rows become one form, calls are trained,
tool results are not, and a template that cannot render tools is refused once, before any row."""
from __future__ import annotations

import json
import logging

import pytest

from finetune.errors import DataError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
OPENAI_ROW = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 C in Paris."}]}
# The same conversation the way LLaMA-Factory's sharegpt tool samples write it.
SHAREGPT_ROW = {"system": "You help with weather.", "tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}})},
    {"from": "observation", "value": "{\"temp\": 21}"},
    {"from": "gpt", "value": "It is 21 C in Paris."}]}
CALL_ONLY = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Oslo"}}}]}]}


def _labels(tok, row):
    out, run = [], []
    for t, m in zip(row["input_ids"], row["assistant_masks"]):
        if m:
            run.append(t)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def test_openai_tool_row_trains_the_call_and_the_reply_not_the_result(build, write_jsonl, tools_tok):
    splits = build({"path": write_jsonl([OPENAI_ROW])}, tokenizer=tools_tok)
    row = splits.train[0]
    text = tools_tok.decode(row["input_ids"])
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # tool definitions in the system turn
    assert _labels(tools_tok, row) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call><|im_end|>',
        "It is 21 C in Paris.<|im_end|>"]
    assert "<tool_response>" in text and not any("temp" in s for s in _labels(tools_tok, row))
    assert json.loads(row["tools"]) == [WEATHER]
    msgs = json.loads(row["messages"])
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "C"}  # parsed, not text
    assert msgs[2]["content"] == "" and msgs[3]["role"] == "tool"


def test_sharegpt_tool_roles_map_to_the_same_form(build, write_jsonl, tools_tok):
    a = build({"path": write_jsonl([OPENAI_ROW], "a.jsonl")}, tokenizer=tools_tok).train[0]
    b = build({"path": write_jsonl([SHAREGPT_ROW], "b.jsonl"), "format": "sharegpt"}, tokenizer=tools_tok).train[0]
    assert b["input_ids"] == a["input_ids"] and b["assistant_masks"] == a["assistant_masks"]


def test_row_ending_in_a_call_is_a_tool_call_row(build, write_jsonl, tools_tok):
    from finetune.data import render_prompt

    row = build({"path": write_jsonl([CALL_ONLY])}, tokenizer=tools_tok).train[0]
    assert row["task"] == "tool_call"
    assert row["target"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    schema = json.loads(row["schema"])
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    prompt = render_prompt(tools_tok, json.loads(row["messages"])[:-1], json.loads(row["tools"]))
    assert row["input_ids"][:len(prompt)] == prompt  # eval's prompt (with tools) is the training prefix


def test_source_level_tools_apply_to_rows_without_their_own(build, write_jsonl, tools_tok):
    row = {"messages": CALL_ONLY["messages"]}
    splits = build({"path": write_jsonl([row]), "tools": [WEATHER["function"]]}, tokenizer=tools_tok)
    assert json.loads(splits.train[0]["tools"]) == [WEATHER]


@pytest.mark.parametrize("call,reason,needle", [
    ({"name": "get_time", "arguments": {}}, "unknown_tool", "calls 'get_time', which is not among the row's tools"),
    ({"name": "get_weather", "arguments": {"unit": "K"}}, "tool_args_mismatch", "'city' is a required property"),
    ({"name": "get_weather", "arguments": "{city: Paris"}, "bad_tool_call", "arguments is a string but not JSON"),
])
def test_bad_tool_calls_are_named(build, write_jsonl, tools_tok, call, reason, needle):
    row = {"tools": [WEATHER], "messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "tool_calls": [{"function": call}]}]}
    with pytest.raises(DataError) as exc:
        build({"path": write_jsonl([row])}, tokenizer=tools_tok, on_error="raise")
    assert f"[{reason}]" in str(exc.value) and needle in str(exc.value) and "data.jsonl:1" in str(exc.value)


def test_tool_call_without_tool_definitions_is_a_bad_row(build, write_jsonl, tools_tok):
    with pytest.raises(DataError, match=r"calls a tool but the row has no tool definitions.*\[missing_tools\]"):
        build({"path": write_jsonl([{"messages": CALL_ONLY["messages"]}])}, tokenizer=tools_tok, on_error="raise")


def test_template_without_tools_is_refused_once_before_any_row(build, write_jsonl, tiny_tok, monkeypatch, caplog):
    import finetune.data.render as render

    calls = []
    real = render.encode
    monkeypatch.setattr(render, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="finetune.data"), pytest.raises(DataError) as exc:
        build({"path": write_jsonl([OPENAI_ROW, CALL_ONLY, OPENAI_ROW])}, tokenizer=tiny_tok)
    msg = str(exc.value)
    assert "cannot render tool definitions (`tools`): 3 rows (first " in msg and "data.jsonl:1" in msg
    assert "assistant tool calls (`tool_calls`): 3 rows" in msg and "model.chat_template" in msg
    assert calls == [] and not [r for r in caplog.records if "skipped" in r.getMessage()]  # no row was rendered


def test_weight_zero_tool_call_turn_is_not_trained(build, write_jsonl, tools_tok):
    row = json.loads(json.dumps(OPENAI_ROW))
    row["messages"][2]["weight"] = 0
    got = _labels(tools_tok, build({"path": write_jsonl([row])}, tokenizer=tools_tok).train[0])
    assert got == ["It is 21 C in Paris.<|im_end|>"]


def test_bundled_tool_demo_set_builds_if_present(build, tools_tok):
    from finetune.paths import DEMO_DATA_DIR

    assert (DEMO_DATA_DIR / "tools_train.jsonl").is_file()
    # three tool schemas per row: the tiny test tokenizer (about 800 tokens, trained on other text) needs room
    splits = build({"path": "demo:tools_train.jsonl"}, tokenizer=tools_tok, max_length=4096)
    assert splits.stats["rows_bad"] == 0 and splits.stats["tasks"].get("tool_call", 0) > 0
    assert splits.stats["rows_kept"] == splits.stats["rows_read"] == 60
