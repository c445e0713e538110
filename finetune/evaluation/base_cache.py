"""The base model's scores, kept between runs: the base does not change when only the adapter does.

Every `finetune train` with eval compares the tuned model with its base on the held-out rows, and the base's
half of that costs as much as the tuned model's: on the demo, 13.9 of 26 s on an AMX Xeon and 151 of 269 s
on a 2-core AVX2 EPYC (2026-12-03), where the base decodes the full 80 tokens on most rows. A second run with
another learning rate or step count scores the same base on the same rows again, for the same numbers.

`eval.base_cache=true` (the default) keeps the base's metrics and per-row predictions under
`<cache>/eval-base/<key>.json`. The key covers everything that can change them: the base weights (each file's
name, size and mtime, as make judges staleness), the tokenizer and chat template the prompts were rendered with
(hashed), the rows (hashed), every eval setting except the ones applied after scoring (gates, report examples,
checkpoints, lm-eval tasks), the compute dtype and device, the CPU model, the torch and transformers versions and
the source of the `finetune` package itself, so that a code change never reuses an old result. Anything that
cannot be fingerprinted (a Hub id not found in the local cache) is not cached. A damaged entry is recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from finetune.paths import PACKAGE_DIR, cache_root, source_hash

log = logging.getLogger("finetune.eval")

# Eval settings that act after the scores exist (or run their own models), so they do not enter the key.
_AFTER_SCORING = {"enabled", "gates", "examples", "checkpoints", "compare_base", "base_cache", "tasks",
                  "task_paths", "num_fewshot", "limit", "apply_chat_template", "allow_code_execution"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _folder_fingerprint(folder: Path) -> list:
    """(name, size, mtime_ns) of each file of a model folder; a rewritten weight file changes its mtime."""
    return [(str(f.relative_to(folder)), st.st_size, st.st_mtime_ns)
            for f in sorted(folder.rglob("*")) if f.is_file() for st in (f.stat(),)]


def _base_weights(cfg) -> list | None:
    """The fingerprint of the folder the base loads from, or None where it cannot be told (not cached)."""
    from finetune.models.load import model_path

    path = Path(model_path(cfg.model)).expanduser()
    if not path.is_dir():
        try:  # a Hub id: its snapshot in the local Hub cache, whose folder name is the commit
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(cfg.model.name_or_path, revision=cfg.model.revision,
                                          local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure only means no caching
            log.debug("base scores not cached: cannot fingerprint %s (%s)", cfg.model.name_or_path, e)
            return None
    return [str(path.resolve()), _folder_fingerprint(path)]


def cache_key(cfg, rows: list[dict], tokenizer_dir: Path, device: str, dtype: Any) -> tuple[str, dict] | None:
    """(key, what it was computed from) for the base's scores on `rows`, or None when not cacheable."""
    import torch
    import transformers

    from finetune.models.cpu import detect_features

    weights = _base_weights(cfg)
    if weights is None:
        return None
    tokenizer = {name: _digest((tokenizer_dir / name).read_bytes())
                 for name in _TOKENIZER_FILES if (tokenizer_dir / name).is_file()}
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        f = detect_features()
        hardware = f"{f.model} {f.capability}"
    inputs = {
        "base": weights,
        "model": {k: getattr(cfg.model, k) for k in ("name_or_path", "gguf_file", "revision", "attn_implementation")},
        "tokenizer": tokenizer,
        "rows": _digest(json.dumps(rows, sort_keys=True, default=str)),
        "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in _AFTER_SCORING},
        "device": device, "dtype": str(dtype), "hardware": hardware,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "finetune_source": source_hash(PACKAGE_DIR),
    }
    return _digest(json.dumps(inputs, sort_keys=True, default=str))[:24], inputs


def entry_path(key: str) -> Path:
    return cache_root() / "eval-base" / f"{key}.json"


def load(key: str, rows: int) -> tuple[dict, list[dict]] | None:
    """The cached (metrics, predictions) for `key`, or None (absent, unreadable or not for `rows` rows)."""
    path = entry_path(key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        metrics, preds = entry["metrics"], entry["predictions"]
        if not isinstance(metrics, dict) or not isinstance(preds, list) or len(preds) != rows:
            raise ValueError(f"{len(preds)} predictions for {rows} rows")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("base scores cache entry %s is damaged (%s): scoring the base again", path, e)
        return None
    return metrics, preds


def store(key: str, inputs: dict, metrics: dict, preds: list[dict]) -> Path | None:
    """Write the entry atomically; a cache that cannot be written costs the next run a base scoring, no more."""
    from finetune.files import write_json_atomic

    path = entry_path(key)
    try:
        return write_json_atomic(path, {"inputs": inputs, "metrics": metrics, "predictions": preds})
    except OSError as e:
        log.warning("cannot keep the base scores at %s (%s): the next run scores the base again", path, e)
        return None
