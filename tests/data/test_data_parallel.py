"""Preprocessing on several processes gives exactly the rows of one process (and counts the same bad rows)."""
from __future__ import annotations


def test_pool_matches_one_process(build, write_jsonl, chat, monkeypatch):
    import finetune.data.parallel as parallel

    rows = [chat(user=f"Question {i}", reply=f"Answer {i}") for i in range(40)] + ["broken"]
    path = write_jsonl(rows)
    one = build({"path": path}, num_proc=1, max_bad_fraction=0.5)
    monkeypatch.setattr(parallel, "MIN_ROWS_FOR_POOL", 0)  # 2,000 in real runs: force the pool on 40 rows
    monkeypatch.setattr(parallel, "CHUNK_ROWS", 7)
    used = []
    real = parallel.ProcessPoolExecutor
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", lambda *a, **k: used.append(a[0]) or real(*a, **k))
    many = build({"path": path}, num_proc=2, max_bad_fraction=0.5)
    assert used == [2]
    assert many.train["input_ids"] == one.train["input_ids"] and many.train["origin"] == one.train["origin"]
    assert many.stats["rows_dropped"] == one.stats["rows_dropped"] == {"bad_json": 1}
