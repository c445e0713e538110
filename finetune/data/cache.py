"""Content-addressed cache of preprocessed splits.

The key hashes everything the output depends on: each source's bytes, the tokenizer (its full
serialized pipeline: vocab, merges, normalizer, special tokens), the chat template, the data config
(format, columns, masking, length policy, seed, ...) and the source of the preprocessing code itself
(`finetune/data/*.py` and its config), so that editing a builder never serves rows rendered by the old
code. Entries are written to a temp folder and renamed into place, so a crash never leaves a half-written
entry under a real key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.data.sources import fingerprint
from finetune.paths import PACKAGE_DIR, cache_root, source_hash
from finetune.config.data import DataConfig

# What decides the rows: the builders, renderers and length policy, and the config they read. Their source is
# hashed into the key; a hand-bumped version number before it once served the old prompts after the schema
# sketch changed (2026-12-04, the demo trained on stale rows with a "cache hit").
CODE_PATHS = (PACKAGE_DIR / "data", PACKAGE_DIR / "config" / "data.py")
_DONE = "stats.json"  # written last inside the entry


def default_cache_dir() -> Path:
    """<FINETUNE_CACHE or ~/.cache/finetune>/data."""
    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, merges, pipeline and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # includes vocab, merges, added tokens, normalizer, pre-tokenizer
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"special": tokenizer.all_special_tokens,
                         "added": sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items())
                         }).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """Hex key of the preprocessed output of `cfg` with `tokenizer`."""
    settings = dataclasses.asdict(cfg)
    settings.pop("cache", None)
    h = hashlib.sha256(source_hash(*CODE_PATHS).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for src in cfg.sources:
        h.update(fingerprint(src.path, src.hub_split).encode())
        if isinstance(src.schema, str) and Path(src.schema).expanduser().is_file():
            h.update(Path(src.schema).expanduser().read_bytes())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:24]


def load(cache_dir: Path, key: str) -> tuple[Any, Any, dict] | None:
    """(train, val, stats) of a complete entry, or None."""
    entry = Path(cache_dir) / key
    if not (entry / _DONE).is_file():
        return None
    import datasets

    try:
        train = datasets.load_from_disk(str(entry / "train"))
        if (entry / "val").is_dir():
            val = datasets.load_from_disk(str(entry / "val"))
        else:  # datasets cannot reload a saved 0-row dataset, so an empty split is not saved
            val = datasets.Dataset.from_dict({k: [] for k in train.features}, features=train.features)
        stats = json.loads((entry / _DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError, IndexError):
        return None  # damaged entry (e.g. files removed by hand): rebuild
    return train, val, stats


def save(cache_dir: Path, key: str, train: Any, val: Any, stats: dict) -> None:
    """Store an entry atomically; a concurrent writer of the same key simply wins."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / key).is_dir() and not (cache_dir / key / _DONE).is_file():
        shutil.rmtree(cache_dir / key, ignore_errors=True)  # damaged by hand: replace it
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    try:
        quiet = are_progress_bars_disabled()
        disable_progress_bars()  # a save of a few MB does not need a progress bar per split in the run log
        try:
            for name, split in (("train", train), ("val", val)):
                if len(split):
                    split.save_to_disk(str(tmp / name))
        finally:
            if not quiet:
                enable_progress_bars()
        (tmp / _DONE).write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, cache_dir / key)
        except OSError:  # already there: another run stored the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
