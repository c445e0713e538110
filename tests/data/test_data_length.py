"""Length policy: drop (default), truncate_prompt (earliest turns, then the prompt; never the target), raise."""
from __future__ import annotations

import json

import pytest

from finetune.data import render_prompt
from finetune.errors import DataError

LONG = " ".join(f"word{i}" for i in range(120))


def _long_multi_turn():
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": LONG}, {"role": "assistant", "content": "First reply."},
                         {"role": "user", "content": "Second question?"}, {"role": "assistant", "content": "Second."},
                         {"role": "user", "content": "Last question?"}, {"role": "assistant", "content": "Last."}]}


def _contract_holds(tok, row):
    msgs = json.loads(row["messages"])
    prompt = render_prompt(tok, msgs[:-1])
    assert row["input_ids"][:len(prompt)] == prompt
    assert tok.decode(row["input_ids"][len(prompt):]).startswith(row["target"] + "<|im_end|>")


def test_drop_is_default_and_counted(build, write_jsonl, chat):
    splits = build({"path": write_jsonl([chat(), _long_multi_turn()])}, max_length=96)
    assert len(splits.train) == 1 and splits.stats["rows_dropped"] == {"too_long": 1}
    assert splits.stats["rows_read"] == splits.stats["rows_kept"] + 1


def test_raise_names_row_and_limit(build, write_jsonl, chat):
    with pytest.raises(DataError, match=r"data\.jsonl:2: row is \d+ tokens, longer than data\.max_length=96"):
        build({"path": write_jsonl([chat(), _long_multi_turn()])}, max_length=96, too_long="raise")


def test_truncate_prompt_drops_earliest_turns_first(build, write_jsonl, tiny_tok):
    splits = build({"path": write_jsonl([_long_multi_turn()])}, max_length=96, too_long="truncate_prompt")
    row = splits.train[0]
    msgs = json.loads(row["messages"])
    assert msgs[0]["content"] == "Be brief."                       # system kept
    assert LONG not in row["messages"] and msgs[-1]["content"] == "Last."
    assert len(row["input_ids"]) <= 96 and splits.stats["rows_truncated"] == 1
    _contract_holds(tiny_tok, row)


def test_truncate_prompt_cuts_the_start_of_a_long_prompt(build, write_jsonl, chat, tiny_tok):
    splits = build({"path": write_jsonl([chat(user=LONG + " What is the last word?", reply="word119")])},
                   max_length=64, too_long="truncate_prompt")
    row = splits.train[0]
    user = json.loads(row["messages"])[-2]["content"]
    assert user.endswith("What is the last word?") and not user.startswith("word0 ")
    assert row["target"] == "word119" and len(row["input_ids"]) <= 64
    _contract_holds(tiny_tok, row)


def test_target_is_never_cut(build, write_jsonl, chat):
    rows = [chat(), chat(user="Repeat.", reply=LONG)]
    splits = build({"path": write_jsonl(rows)}, max_length=64, too_long="truncate_prompt")
    assert splits.stats["rows_dropped"] == {"reply_too_long": 1}
    assert LONG not in splits.train["target"]
