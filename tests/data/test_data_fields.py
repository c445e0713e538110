"""Every field of the formats we claim is honoured, and the ones a format does not use are counted, not lost."""
from __future__ import annotations

import json
import logging

import pytest

from finetune.errors import DataError


def _msgs(splits, i=0, split="train"):
    return json.loads(getattr(splits, split)[i]["messages"])


def _labelled_text(tok, row):
    return tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])


def test_alpaca_history_and_system_become_earlier_turns(build, write_jsonl, tiny_tok):
    row = {"instruction": "And 3 plus 3?", "input": "", "output": "6.", "system": "Be brief.",
           "history": [["What is 1 plus 1?", "2."], ["And 2 plus 2?", "4."]]}
    splits = build({"path": write_jsonl([row]), "format": "alpaca"})
    assert _msgs(splits) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."},
        {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"}, {"role": "assistant", "content": "6."}]
    assert _labelled_text(tiny_tok, splits.train[0]) == "2.<|im_end|>4.<|im_end|>6.<|im_end|>"


def test_sharegpt_top_level_system_wins_over_the_template_default(build, write_jsonl, qwen_tok):
    row = {"system": "You are a pirate.", "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Arr."}]}
    splits = build({"path": write_jsonl([row]), "format": "sharegpt"}, tokenizer=qwen_tok)
    assert _msgs(splits)[0] == {"role": "system", "content": "You are a pirate."}
    text = qwen_tok.decode(splits.train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a pirate.") and "You are Qwen" not in text


def test_weight_zero_reply_is_not_trained(build, write_jsonl, tiny_tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad reply.", "weight": 0},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good reply.",
                                                                "weight": 1}]}
    splits = build({"path": write_jsonl([row])})
    assert _labelled_text(tiny_tok, splits.train[0]) == "Good reply.<|im_end|>"


def test_all_replies_weight_zero_is_a_bad_row(build, write_jsonl, chat):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No.", "weight": 0}]}
    with pytest.raises(DataError, match=r"data\.jsonl:1: every assistant reply has weight 0.*\[nothing_to_train\]"):
        build({"path": write_jsonl([row])}, on_error="raise")


def test_content_parts_are_joined_and_media_parts_refused(build, write_jsonl, chat):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Line one."},
                                                       {"type": "text", "text": "Line two."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Ok."}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    splits = build({"path": write_jsonl([parts])})
    assert _msgs(splits) == [{"role": "user", "content": "Line one.\nLine two."}, {"role": "assistant", "content": "Ok."}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: messages\[0\]\.content\[1\] is an 'image_url' part; this "
                                        r"framework trains text models.*\[non_text_content\]"):
        build({"path": write_jsonl([image])}, on_error="raise")


def test_message_name_is_kept_and_reported_when_the_template_drops_it(build, write_jsonl, caplog):
    row = {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}]}
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        splits = build({"path": write_jsonl([row])})
    assert _msgs(splits)[0]["name"] == "ann"
    assert splits.stats["unused_fields"] == {"messages[].name (not rendered by the chat template)": 1}


def test_unused_fields_are_counted_per_field_and_named_in_one_warning(build, write_jsonl, chat, caplog):
    rows = [{**chat(), "id": i, "lang": "en"} for i in range(3)] + [{**chat(user="Other"), "id": 9}]
    rows[0]["messages"][1]["timestamp"] = 5
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        splits = build({"path": write_jsonl(rows)})
    assert splits.stats["unused_fields"] == {"id": 4, "lang": 3, "messages[].timestamp": 1}
    assert splits.stats["sources"][0]["unused_fields"] == {"id": 4, "lang": 3, "messages[].timestamp": 1}
    warnings = [r.getMessage() for r in caplog.records if "were ignored" in r.getMessage()]
    assert len(warnings) == 1 and "id (4 rows)" in warnings[0] and "lang (3 rows)" in warnings[0]


def test_duplicates_are_counted_and_never_straddle_train_and_val(build, write_jsonl, chat):
    rows = [chat(user=f"Question {i}", reply=f"Answer {i}") for i in range(10)] * 3  # every row three times
    splits = build({"path": write_jsonl(rows)}, val_fraction=0.3, seed=3)
    assert splits.stats["duplicates"] == 20
    assert not set(splits.train["messages"]) & set(splits.val["messages"])
    assert len(splits.val) % 3 == 0 and len(splits.val) > 0  # whole groups moved


def test_val_source_duplicate_is_dropped_from_train(build, write_jsonl, chat):
    train = write_jsonl([chat(user="A"), chat(user="B"), chat(user="C")], "t.jsonl")
    val = write_jsonl([chat(user="B")], "v.jsonl")
    splits = build({"path": train}, {"path": val, "split": "val"})
    assert splits.stats["sources"][0]["rows_dropped"] == {"duplicate_of_val": 1}
    assert len(splits.train) == 2
    s = splits.stats
    assert s["rows_read"] + s["rows_from_turn_split"] == s["rows_kept"] + sum(s["rows_dropped"].values())


def test_reasoning_template_gets_one_row_per_turn_each_rendered_as_inference(build, write_jsonl, reasoning_tok):
    from finetune.data import render_prompt

    row = {"messages": [{"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2.", "reasoning_content": "One and one."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."}]}
    splits = build({"path": write_jsonl([row])}, tokenizer=reasoning_tok)
    assert len(splits.train) == 2 and splits.stats["rows_from_turn_split"] == 1
    for r in splits.train:
        msgs = json.loads(r["messages"])
        prompt = render_prompt(reasoning_tok, msgs[:-1])
        assert r["input_ids"][:len(prompt)] == prompt  # the prefix exactly as inference renders it
        labelled = _labelled_text(reasoning_tok, r)
        assert labelled == f"<think>\n{msgs[-1]['reasoning_content']}\n</think>\n\n{msgs[-1]['content']}<|im_end|>"
    masked = build({"path": write_jsonl([row])}, tokenizer=reasoning_tok, train_on_reasoning=False)
    assert sorted(_labelled_text(reasoning_tok, r) for r in masked.train) == ["2.<|im_end|>", "4.<|im_end|>"]


def test_reasoning_with_a_template_that_cannot_render_it_is_refused_once(build, write_jsonl):
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"},
                          {"role": "assistant", "content": "A.", "reasoning_content": "Because."}]} for i in range(5)]
    with pytest.raises(DataError, match=r"cannot render reasoning \(`reasoning_content`\): 5 rows \(first "
                                        r".*data\.jsonl:1\)"):
        build({"path": write_jsonl(rows)})


def test_allow_val_overlap_keeps_the_train_copy(build, write_jsonl, chat):
    train = write_jsonl([chat(user="A"), chat(user="B"), chat(user="C")], "t.jsonl")
    val = write_jsonl([chat(user="B")], "v.jsonl")
    splits = build({"path": train}, {"path": val, "split": "val"}, allow_val_overlap=True)
    assert len(splits.train) == 3 and "duplicate_of_val" not in splits.stats["sources"][0]["rows_dropped"]
