"""Run directories: atomic writes of files and folders, memory readings."""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a published file gets the usual mode (0644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CUDA: peak allocated on the current device)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: Path, output: Path) -> Path:
    """Swap a finished temporary folder in under its real name; an old `output` goes only after that.

    The one way a folder artifact appears (merged/, adapter/, export/gguf-*/, checkpoints/checkpoint-N/):
    a reader sees the old folder or the new one, whole. An old `output` is moved aside first, under a
    `.tmp-old-*` name, which the checkpoint cleanup (finetune.train.checkpoint.clean_staging) removes if a
    crash strikes between the two renames. mkdtemp/mkstemp create private entries (0700/0600); a published
    artifact gets the usual modes.
    """
    import shutil

    tmp, output = Path(tmp), Path(output)
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{output.name}-", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return output


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (a 6 GB checkpoint never sits in memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
