"""The bundled demo data: regenerated identically by its script, and in the documented shapes."""
from __future__ import annotations

import json

import jsonschema

from finetune.demo_data import make_demo_data
from finetune.paths import DEMO_DATA_DIR

FILES = {"instruct_train.jsonl": 48, "instruct_val.jsonl": 8, "structured_train.jsonl": 64, "structured_val.jsonl": 16}


def _rows(name):
    return [json.loads(line) for line in (DEMO_DATA_DIR / name).read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic_and_matches_bundled_files(tmp_path):
    make_demo_data.main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_DATA_DIR / name).read_bytes(), name


def test_row_counts():
    for name, n in FILES.items():
        assert len(_rows(name)) == n, name


def test_instruct_rows_have_system_and_multi_turn():
    rows = _rows("instruct_train.jsonl")
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "user" for m in r["messages"]) >= 2 for r in rows)
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant"


def test_structured_targets_validate_and_are_copied_from_input():
    schemas = set()
    for name in ("structured_train.jsonl", "structured_val.jsonl"):
        for r in _rows(name):
            jsonschema.validate(r["output"], r["schema"])
            schemas.add(json.dumps(r["schema"], sort_keys=True))
            for v in r["output"].values():
                assert str(v) in r["input"]
    assert len(schemas) == 2
