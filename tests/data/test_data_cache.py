"""The preprocessed-data cache: reused when inputs match, rebuilt when any input changes, written atomically."""
from __future__ import annotations

import copy

from finetune.data import build_datasets


def _run(make_cfg, tok, cache_dir, path, **settings):
    return build_datasets(make_cfg(path, cache=True, **settings), tok, cache_dir=cache_dir)


def _hit(splits):
    return splits.stats["cache"]["hit"]


def test_second_run_reuses_and_equals_first(make_cfg, tiny_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat(), chat(user="Hi", reply="Hello")])
    first = _run(make_cfg, tiny_tok, cache_dir, path)
    second = _run(make_cfg, tiny_tok, cache_dir, path)
    assert not _hit(first) and _hit(second)
    assert second.train.to_dict() == first.train.to_dict()
    assert second.stats["train"] == first.stats["train"]
    assert [p.name for p in cache_dir.iterdir()] == [first.stats["cache"]["key"]]  # no temp dir left behind


def test_changed_data_file_rebuilds(make_cfg, tiny_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat()])
    _run(make_cfg, tiny_tok, cache_dir, path)
    write_jsonl([chat(reply="Four.")])
    again = _run(make_cfg, tiny_tok, cache_dir, path)
    assert not _hit(again) and again.train[0]["target"] == "Four."


def test_changed_tokenizer_rebuilds(make_cfg, tiny_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat()])
    _run(make_cfg, tiny_tok, cache_dir, path)
    tok = copy.deepcopy(tiny_tok)
    tok.add_tokens(["plus"])
    assert not _hit(_run(make_cfg, tok, cache_dir, path))


def test_changed_chat_template_rebuilds(make_cfg, tiny_tok, qwen_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat()])
    _run(make_cfg, tiny_tok, cache_dir, path)
    assert not _hit(_run(make_cfg, qwen_tok, cache_dir, path))


def test_changed_settings_rebuild(make_cfg, tiny_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat()])
    _run(make_cfg, tiny_tok, cache_dir, path)
    assert not _hit(_run(make_cfg, tiny_tok, cache_dir, path, train_on="everything"))
    assert not _hit(_run(make_cfg, tiny_tok, cache_dir, path, max_length=100))
    assert _hit(_run(make_cfg, tiny_tok, cache_dir, path, train_on="everything"))


def test_changed_preprocessing_code_rebuilds(make_cfg, tiny_tok, cache_dir, write_jsonl, chat, tmp_path,
                                             monkeypatch):
    # The key hashes the builders' source: a change to a renderer (here a stand-in file) must not reuse rows
    # the old code rendered, as it once did when only a hand-bumped version was hashed.
    from finetune.data import cache
    from finetune.paths import source_hash

    code = tmp_path / "code"
    code.mkdir()
    (code / "render.py").write_text("SKETCH = 'a|b'\n")
    monkeypatch.setattr(cache, "CODE_PATHS", (code,))
    path = write_jsonl([chat()])
    first = _run(make_cfg, tiny_tok, cache_dir, path)
    assert _hit(_run(make_cfg, tiny_tok, cache_dir, path))
    (code / "render.py").write_text("SKETCH = '(a|b)'\n")
    source_hash.cache_clear()  # the hash is read once per process; a new process reads the edited file
    again = _run(make_cfg, tiny_tok, cache_dir, path)
    assert not _hit(again) and again.stats["cache"]["key"] != first.stats["cache"]["key"]


def test_default_location_follows_finetune_cache(make_cfg, tiny_tok, tmp_path, write_jsonl, chat, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "fc"))
    splits = build_datasets(make_cfg(write_jsonl([chat()]), cache=True), tiny_tok)
    assert (tmp_path / "fc" / "data" / splits.stats["cache"]["key"] / "stats.json").is_file()


def test_damaged_entry_is_rebuilt(make_cfg, tiny_tok, cache_dir, write_jsonl, chat):
    path = write_jsonl([chat()])
    key = _run(make_cfg, tiny_tok, cache_dir, path).stats["cache"]["key"]
    (cache_dir / key / "stats.json").unlink()  # as if a crash had happened before the entry was complete
    assert not _hit(_run(make_cfg, tiny_tok, cache_dir, path))
    assert _hit(_run(make_cfg, tiny_tok, cache_dir, path))
