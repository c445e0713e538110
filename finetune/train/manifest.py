"""Checkpoint manifests: which files a checkpoint holds, their sizes and SHA-256, written last.

"All required files exist" was all a resume checked, so a truncated optimizer.pt or a damaged safetensors file
was picked (and gave a raw traceback) instead of the previous good checkpoint. The manifest is the last file
written into the staging folder before it is renamed into place; a checkpoint verifies when every listed file
is there with its size and hash. Hashing costs about 1 s per GB (the optimizer state of a r=16 Qwen2.5-3B
LoRA is 240 MB), paid once per resume, not per save.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from finetune.files import write_json_atomic
from finetune.files import sha256_file

log = logging.getLogger("finetune.train.manifest")

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> Path:
    """manifest.json listing every other file of `folder` (relative path -> size, sha256)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    return write_json_atomic(folder / MANIFEST, {"files": files})


def manifest_problem(folder: Path) -> Optional[str]:
    """Why `folder` does not verify against its manifest (None when it does)."""
    import json

    path = Path(folder) / MANIFEST
    if not path.is_file():
        return "no manifest.json (the save did not finish, or an older finetune wrote it)"
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest.json unreadable ({e})"
    for rel, want in files.items():
        f = Path(folder) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (damaged)"
    return None


def newest_verified(checkpoints: list[Path]) -> Optional[Path]:
    """The newest of `checkpoints` (oldest first) that verifies; each newer one skipped is logged with why."""
    for path in reversed(checkpoints):
        problem = manifest_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None
