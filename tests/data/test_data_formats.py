"""Every format and file type becomes the same conversation form; `columns` renames fields."""
from __future__ import annotations

import csv
import json

import pytest


def _messages(splits, split="train"):
    rows = getattr(splits, split)
    return sorted((json.loads(m) for m in rows["messages"]), key=json.dumps)


EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3.\n\n2, 3"},
            {"role": "assistant", "content": "5"}]


def test_alpaca(build, write_jsonl):
    path = write_jsonl([{"instruction": "Add 2 and 3.", "input": "2, 3", "output": "5", "system": "Be brief."},
                        {"instruction": " Say hi. ", "input": "", "output": "Hi."}])
    got = _messages(build({"path": path, "format": "alpaca"}))
    assert EXPECTED in got
    assert [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}] in got


def test_sharegpt_multi_turn(build, write_jsonl):
    conv = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]
    splits = build({"path": write_jsonl([{"conversations": conv}]), "format": "sharegpt"})
    assert json.loads(splits.train[0]["messages"]) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]
    assert splits.train[0]["target"] == "Goodbye" and splits.train[0]["task"] == "chat"


def test_messages_and_completion(build, write_jsonl, chat):
    m = build({"path": write_jsonl([chat(user="Q", reply="A")], "m.jsonl"), "format": "messages"})
    c = build({"path": write_jsonl([{"prompt": "Q", "completion": "A"}], "c.jsonl"), "format": "completion"})
    assert m.train["messages"] == c.train["messages"] and m.train["input_ids"] == c.train["input_ids"]


def test_columns_rename_top_level_and_message_keys(build, write_jsonl):
    a = build({"path": write_jsonl([{"question": "Q", "answer": "A"}], "a.jsonl"), "format": "alpaca",
               "columns": {"instruction": "question", "output": "answer"}})
    assert _messages(a) == [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]]
    row = {"dialog": [{"speaker": "human", "text": "Q"}, {"speaker": "gpt", "text": "A"}]}
    s = build({"path": write_jsonl([row], "s.jsonl"), "format": "sharegpt",
               "columns": {"conversations": "dialog", "from": "speaker", "value": "text"}})
    assert _messages(s) == _messages(a)


ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(5)]


def _write(tmp_path, kind):
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
            w.writeheader()
            w.writerows(ROWS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return str(path)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet"])
def test_file_types_give_the_same_rows(build, tmp_path, kind):
    ref = build({"path": _write(tmp_path, "jsonl"), "format": "completion"})
    got = build({"path": _write(tmp_path, kind), "format": "completion"})
    assert got.train["input_ids"] == ref.train["input_ids"]
    assert got.train["origin"][0].startswith(str(tmp_path / f"rows.{kind}"))


def test_messages_stored_as_json_string_in_parquet(build, tmp_path, chat):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(chat()["messages"])}]), path)
    assert build({"path": str(path)}).train[0]["target"] == chat()["messages"][-1]["content"]


def test_dataset_folder_goes_through_datasets_load_dataset(build, tmp_path, monkeypatch, chat):
    # Same code path as a Hub id (datasets.load_dataset), without the network.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(chat()) + "\n", encoding="utf-8")
    splits = build({"path": str(folder), "hub_split": "train"})
    assert splits.train[0]["origin"] == f"{folder}[train] row 0"
    assert splits.train[0]["target"] == chat()["messages"][-1]["content"]
