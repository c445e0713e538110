"""Tool-call rows in evaluation (metrics) and generation (the call constrained to the tool's schema)."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch

from finetune.data.tools import call_schema, normalize_tools
from finetune.evaluation.metrics import aggregate, parse_tool_calls, score_row
from tests.data.conftest import TOOLS_TEMPLATE

TOOLS = normalize_tools([
    {"name": "get_weather", "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                                           "properties": {"city": {"type": "string", "maxLength": 10},
                                                          "unit": {"enum": ["C", "F"]}}}},
    {"name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                        "properties": {"zone": {"enum": ["UTC", "CET"]}}}}])
SCHEMA = json.dumps(call_schema(TOOLS))
GOLD = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


def _score(generated):
    return score_row(generated, GOLD, "tool_call", SCHEMA)


def test_exact_call_scores_full_marks():
    row = _score(GOLD)
    assert row["tool_call_valid"] == row["tool_name_match"] == row["tool_args_valid"] == row["tool_call_match"] == 1.0
    assert row["tool_args_f1"] == 1.0 and row["exact_match"] == 1.0


def test_same_call_in_another_wire_format_still_matches():
    row = _score('{"name": "get_weather", "parameters": {"unit": "C", "city": "Paris"}}')  # Llama 3.1 style
    assert row["tool_call_match"] == 1.0 and row["exact_match"] == 0.0


def test_partly_wrong_arguments_get_field_f1():
    row = _score('<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "C"}}</tool_call>')
    assert row["tool_name_match"] == 1.0 and row["tool_args_valid"] == 1.0 and row["tool_call_match"] == 0.0
    assert row["tool_args_f1"] == pytest.approx(0.5)


def test_wrong_tool_invalid_arguments_and_broken_json():
    wrong_name = _score('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    assert wrong_name["tool_call_valid"] == 1.0 and wrong_name["tool_name_match"] == 0.0
    assert wrong_name["tool_args_valid"] == 1.0 and wrong_name["tool_args_f1"] == 0.0
    bad_args = _score('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "K"}}</tool_call>')
    assert bad_args["tool_args_valid"] == 0.0 and bad_args["tool_name_match"] == 1.0
    broken = _score('<tool_call>{"name": "get_weather", "arguments": {"city": "Par')
    assert broken["tool_call_valid"] == broken["tool_name_match"] == broken["tool_args_f1"] == 0.0


def test_aggregate_reports_tool_call_rates_micro_f1():
    rows = [{**_score(GOLD), "generated": GOLD, "target": GOLD, "task": "tool_call", "stopped": 1.0},
            {**_score("I cannot call tools."), "generated": "x", "target": GOLD, "task": "tool_call", "stopped": 1.0}]
    m = aggregate(rows)
    assert m["tool_call_valid_rate"] == 0.5 and m["tool_name_match_rate"] == 0.5 and m["rows_tool_call"] == 2
    assert m["tool_args_recall"] == 0.5 and m["tool_args_precision"] == 1.0


def test_parse_finds_parallel_calls_in_order():
    text = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]


@pytest.fixture(scope="module")
def tools_tok(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.padding_side = "left"
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def test_constrained_tool_call_is_valid_for_its_tool(tiny_dir, tools_tok):
    """The random tiny model writes garbage; under the mask every row is one valid call in the template's format."""
    pytest.importorskip("llguidance")
    from transformers import AutoModelForCausalLM

    from finetune.data.render import tool_call_format
    from finetune.generate.constrained import tool_call_processor

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    wire = tool_call_format(tools_tok)
    assert wire is not None and wire.prefix == "<tool_call>\n" and wire.separators == (", ", ": ")
    one_tool = [TOOLS[:1], TOOLS[1:], TOOLS]
    schemas = [call_schema(t) for t in one_tool]
    texts = [tools_tok.apply_chat_template([{"role": "user", "content": "Call a tool" + "!" * i}], tools=t,
                                           add_generation_prompt=True, tokenize=False) for i, t in enumerate(one_tool)]
    enc = tools_tok(texts, return_tensors="pt", padding=True)
    eos = tools_tok.convert_tokens_to_ids("<|im_end|>")
    proc = tool_call_processor(tools_tok, schemas, model.config.vocab_size, prefix=wire.prefix, suffix=wire.suffix,
                               separators=wire.separators, eos_token_id=eos)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=120, do_sample=False, logits_processor=[proc],
                             pad_token_id=tools_tok.pad_token_id, eos_token_id=[eos, tools_tok.pad_token_id])
    for row, schema, tools in zip(out[:, enc["input_ids"].shape[1]:].tolist(), schemas, one_tool):
        assert eos in row, tools_tok.decode(row)
        text = tools_tok.decode(row[:row.index(eos)])
        assert text.startswith(wire.prefix) and text.endswith(wire.suffix), text
        call = json.loads(text[len(wire.prefix):-len(wire.suffix)])
        jsonschema.validate(call, schema)
        scored = score_row(text, text, "tool_call", json.dumps(call_schema(tools)))
        assert scored["tool_args_valid"] == 1.0


def test_unconstrained_tiny_model_does_not_write_a_call(tiny_dir, tools_tok):
    # The check above means something: without the processor the random model writes no valid call.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    text = tools_tok.apply_chat_template([{"role": "user", "content": "Call a tool"}], tools=copy.deepcopy(TOOLS),
                                         add_generation_prompt=True, tokenize=False)
    enc = tools_tok([text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tools_tok.pad_token_id)
    assert parse_tool_calls(tools_tok.decode(out[0, enc["input_ids"].shape[1]:])) == []
