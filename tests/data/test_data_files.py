"""Files as people have them: compressed, sharded, BOM, CR endings, JSON Lines in .json; and the ones we refuse."""
from __future__ import annotations

import gzip
import json

import pytest

from finetune.errors import DataError

ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(4)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)


def _targets(splits):
    return sorted(splits.train["target"])


EXPECTED = sorted(r["completion"] for r in ROWS)


@pytest.mark.parametrize("name,data", [
    ("rows.jsonl.gz", gzip.compress(JSONL.encode())),
    ("rows.json.gz", gzip.compress(json.dumps(ROWS).encode())),
    ("bom.jsonl", b"\xef\xbb\xbf" + JSONL.encode()),
    ("crlf.jsonl", JSONL.replace("\n", "\r\n").encode()),
    ("cr_only.jsonl", JSONL.replace("\n", "\r").encode()),
    ("cr_only.csv", ("prompt,completion\r" + "".join(f"{r['prompt']},{r['completion']}\r" for r in ROWS)).encode()),
    ("bom.csv", b"\xef\xbb\xbf" + ("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n"
                                                                  for r in ROWS)).encode()),
    ("lines.json", JSONL.encode()),
])
def test_file_shapes_read_the_same_rows(build, tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert _targets(build({"path": str(path), "format": "completion"})) == EXPECTED


def test_cr_only_lines_keep_their_line_numbers(build, tmp_path):
    path = tmp_path / "cr.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\r{broken\r" + json.dumps(ROWS[1]) + "\r").encode())
    with pytest.raises(DataError, match=r"cr\.jsonl:2: broken JSON"):
        build({"path": str(path), "format": "completion"}, on_error="raise")


def test_json_holding_json_lines_says_so(build, tmp_path, caplog):
    path = tmp_path / "lines.json"
    path.write_text(JSONL, encoding="utf-8")
    build({"path": str(path), "format": "completion"})
    assert any("holds JSON Lines" in r.getMessage() for r in caplog.records)


def test_folder_of_shards_is_one_source_with_line_numbers(build, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]), encoding="utf-8")
    (folder / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS[2:]).encode()))
    splits = build({"path": str(folder), "format": "completion"})
    assert _targets(splits) == EXPECTED
    assert f"{folder}/part-1.jsonl.gz:2" in splits.train["origin"]


@pytest.mark.parametrize("encoding,named", [("utf-16", "UTF-16 little-endian"), ("utf-16-le", r"UTF-16 little-endian \(no byte-order mark\)")])
def test_utf16_is_detected_and_named(build, tmp_path, encoding, named):
    for suffix in (".jsonl", ".json", ".csv"):
        path = tmp_path / f"wide{suffix}"
        path.write_bytes((JSONL if suffix != ".csv" else "prompt,completion\nq,a\n").encode(encoding))
        with pytest.raises(DataError, match=rf"wide\{suffix}: the file is {named}.*iconv -f utf-16"):
            build({"path": str(path), "format": "completion"})


def test_not_gzip_is_a_clear_error(build, tmp_path):
    path = tmp_path / "fake.jsonl.gz"
    path.write_text(JSONL, encoding="utf-8")
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz: cannot decompress"):
        build({"path": str(path), "format": "completion"})


def test_lone_surrogate_and_nan_are_refused_with_the_row_named(build, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "Hi \\ud800 there", "completion": "x"}\n'
                    + '{"prompt": "Hi", "completion": NaN}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: prompt holds a lone UTF-16 surrogate \(\\ud800\).*"
                                        r"\[lone_surrogate\]"):
        build({"path": str(path), "format": "completion"}, on_error="raise")
    splits = build({"path": str(path), "format": "completion"}, max_bad_fraction=1.0)
    assert splits.stats["rows_dropped"] == {"lone_surrogate": 1, "non_finite": 1}


def test_nan_inside_a_json_file_refuses_that_row_only(build, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS).rstrip("]") + ', {"prompt": "p", "completion": Infinity}]', encoding="utf-8")
    splits = build({"path": str(path), "format": "completion"}, max_bad_fraction=1.0)
    assert splits.stats["rows_dropped"] == {"non_finite": 1} and len(splits.train) == 4


def test_structured_target_with_nan_is_refused(build, write_jsonl):
    schema = {"type": "object", "properties": {"score": {"type": "number"}}}
    rows = [{"input": "a", "output": '{"score": NaN}', "schema": schema}, {"input": "b", "output": {"score": 1}, "schema": schema}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: output\.score is NaN or Infinity.*\[non_finite\]"):
        build({"path": write_jsonl(rows), "format": "structured"}, on_error="raise")
