"""build_datasets on the demo config with the embedded tiny tokenizer: columns, masks, prefix contract."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from finetune.data import build_datasets, preview, render_prompt, write_stats
from finetune.paths import CONFIG_DIR
from finetune.config.data import DataConfig

COLUMNS = {"input_ids", "assistant_masks", "messages", "task", "schema", "target", "origin", "tools"}


def demo_config(**overrides) -> DataConfig:
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(node, overrides))


@pytest.fixture(scope="module")
def demo_splits(tiny_tok, tmp_path_factory):
    return build_datasets(demo_config(), tiny_tok, cache_dir=tmp_path_factory.mktemp("cache"))


def label_runs(mask):
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_demo_splits_have_the_contract_columns(demo_splits):
    assert set(demo_splits.train.column_names) == COLUMNS
    assert len(demo_splits.train) == 64 + 48 and len(demo_splits.val) == 16 + 8
    assert {*demo_splits.train["task"]} == {"chat", "structured"}


def test_masks_label_exactly_replies_and_end_of_turn(demo_splits, tiny_tok):
    im_end = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    for row in demo_splits.train:
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        replies = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "assistant"]
        runs = label_runs(mask)
        assert len(runs) == len(replies)
        for (a, b), reply in zip(runs, replies):
            assert ids[b - 1] == im_end                       # the end-of-turn closes each labelled run
            assert tiny_tok.decode(ids[a:b - 1]) == reply     # and the rest is exactly the reply
            assert tiny_tok.decode(ids[a - 3:a]) == "<|im_start|>assistant\n"  # header not labelled


def test_generation_prompt_equals_training_prefix(demo_splits, tiny_tok):
    for split in (demo_splits.train, demo_splits.val):
        for row in split:
            msgs = json.loads(row["messages"])
            prompt = render_prompt(tiny_tok, msgs[:-1])
            last_start = label_runs(row["assistant_masks"])[-1][0]
            assert row["input_ids"][:last_start] == prompt
            assert row["target"] == msgs[-1]["content"]


def test_structured_rows_keep_schema_and_valid_target(demo_splits):
    import jsonschema

    rows = [r for r in demo_splits.train if r["task"] == "structured"]
    assert len(rows) == 64
    for r in rows:
        schema = json.loads(r["schema"])
        target = json.loads(r["target"])
        jsonschema.validate(target, schema)
        assert list(target) == list(schema["properties"])  # schema key order by default
        assert r["schema"] in json.loads(r["messages"])[0]["content"]  # the schema is in the prompt
    assert all(r["schema"] == "" for r in demo_splits.train if r["task"] == "chat")


def test_system_message_kept_in_messages(demo_splits):
    msgs = [json.loads(m) for m in demo_splits.train["messages"]]
    assert any(m[0]["role"] == "system" for m in msgs)


def test_stats_and_write_stats(demo_splits, tmp_path):
    stats = demo_splits.stats
    assert stats["rows_read"] == 136 and stats["rows_kept"] == 136 and stats["rows_dropped"] == {}
    assert stats["train"]["label_tokens"] == sum(map(sum, demo_splits.train["assistant_masks"]))
    assert sum(stats["train"]["length_histogram"].values()) == len(demo_splits.train)
    path = write_stats(stats, tmp_path)
    assert path == tmp_path / "data" / "stats.json"
    assert json.loads(path.read_text()) == stats
    assert not [p for p in path.parent.iterdir() if p.name != "stats.json"]  # no temp file left


def test_preview_marks_label_spans(demo_splits, tiny_tok):
    text = preview(demo_splits, tiny_tok, n=2, color=False)
    assert text.count("--- train row") == 2
    assert "[[" in text and "<|im_end|>]]" in text
    assert "[[<|im_start|>" not in text
