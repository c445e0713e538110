"""One run per directory: a lock file, leftovers of crashed writes, and what a new run may do to an old one.

Two trainings in one directory interleaved their metrics.jsonl lines and crashed each other's checkpoint saves.
`<run>/.lock` holds the owner's PID and process start time; a lock whose process is gone (or whose PID now
belongs to a process started later: PIDs are reused) is stale and taken over with a warning. It is released when
run_training returns and, for any other exit but SIGKILL, at interpreter exit; after a SIGKILL the PID check
finds it stale.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.train.lock")

LOCK_NAME = ".lock"
# What crashed atomic writes leave in a run directory (finetune.files.publish_folder, train.adapter, merge, export).
LEFTOVER_PATTERNS = (".tmp-adapter-*", ".merged.tmp-*", ".tmp-old-*", "export/.gguf-*.tmp-*", "*.tmp")
# A restart from scratch (train.overwrite=true) removes these, so nothing of the old run mixes with the new one.
RUN_OUTPUTS = ("checkpoints", "adapter", "merged", "eval", "export", "verify", "plots", "tensorboard",
               "metrics.jsonl", "generations.jsonl", "pissa_init")


def _start_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class RunLock:
    """`<run>/.lock` owned by this process; `release()` removes it (idempotent)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        """Raises FinetuneError when another live process holds the lock (its PID and start time are named)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise FinetuneError(f"{self.path}: could not take the run lock; remove the file if no run uses "
                            f"{self.path.parent}")

    def _check_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            pid, started = int(owner["pid"]), owner.get("started")
        except (OSError, ValueError, KeyError, TypeError):
            owner, pid, started = {}, -1, None  # half-written by a process killed while taking it
        same_host = owner.get("host", socket.gethostname()) == socket.gethostname()
        alive = pid > 0 and _start_time(pid) is not None and (started is None or abs(_start_time(pid) - started) < 1)
        if alive and same_host and pid != os.getpid():
            raise FinetuneError(
                f"{self.path.parent} is in use by another run (process {pid}, lock file {self.path}); wait for it to "
                "finish, or train into another directory (hydra.run.dir=...). If that process is not a finetune "
                "run, delete the lock file")
        if alive and not same_host:
            raise FinetuneError(f"{self.path.parent} is locked by process {pid} on host {owner.get('host')}; "
                                "wait for it, or delete the lock file if that run is gone")
        log.warning("taking over the stale lock %s (process %s is gone)", self.path, pid)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run directory's lock (see module doc) and clean what crashed writes left there."""
    lock = RunLock(run_dir).acquire()
    clean_leftovers(run_dir)
    return lock


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove temporary folders/files of writes that never finished (a crash between write and rename)."""
    run_dir = Path(run_dir)
    found = sorted({p for pattern in LEFTOVER_PATTERNS for p in run_dir.glob(pattern)})
    for p in found:
        log.warning("removing %s: left by a write that did not finish", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def previous_run(run_dir: Path) -> list[str]:
    """What an earlier training left in `run_dir` (adapter/, checkpoints, metrics), for train.resume=never."""
    run_dir = Path(run_dir)
    found = [n for n in ("adapter", "checkpoints", "metrics.jsonl") if (run_dir / n).exists()]
    return [n for n in found if not (run_dir / n).is_dir() or any((run_dir / n).iterdir())]


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """train.resume=never: refuse a directory holding another run unless train.overwrite=true, which clears it.

    Raises:
        FinetuneError: naming what is there and the two ways on.
    """
    found = previous_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise FinetuneError(
            f"train.resume=never, but {run_dir} already holds a run ({', '.join(found)}); starting over would mix "
            "the two. Pass train.overwrite=true to delete it and start over, use train.resume=auto to continue it, "
            "or train into another directory (hydra.run.dir=...)")
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("train.overwrite=true: removed the previous run's %s from %s", ", ".join(found), run_dir)


def finished_or_fresh(cfg, run_dir: Path, resume_from: Optional[Path]) -> Optional[dict]:
    """Before anything is written: the summary of a run that is already finished (then nothing is trained), or
    None after checking that a start from scratch may use this directory (train.resume=never / overwrite).

    Raises:
        FinetuneError: train.resume=never into a directory that holds a run, without train.overwrite=true.
    """
    from finetune.train.guards import already_trained, finished_run

    if resume_from is not None and already_trained(resume_from, cfg.train.max_steps):
        prov = finished_run(run_dir, cfg.train.max_steps)
        if prov is not None:
            print(f"{run_dir} is finished: {prov['steps']} of train.max_steps={cfg.train.max_steps} steps trained, "
                  f"adapter in {Path(run_dir) / 'adapter'}; nothing to train. Raise train.max_steps (with "
                  "train.allow_changes=true) to train further, or start over with train.resume=never "
                  "train.overwrite=true")
            return {"run_dir": str(run_dir), "steps": prov["steps"], "finished": True,
                    "adapter": str(Path(run_dir) / "adapter")}
    if cfg.train.resume == "never":
        check_fresh_start(run_dir, cfg.train.overwrite)
    return None


def record_changes(config_yaml: Path, checkpoint: Path) -> None:
    """Append, as YAML comments (the file stays a config that reruns), which values changed at which step."""
    from finetune.files import write_text_atomic
    from finetune.train.checkpoint import META_NAME
    from finetune.train.guards import changed_values, checkpoint_step

    try:
        saved = json.loads((Path(checkpoint) / META_NAME).read_text(encoding="utf-8")).get("train", {})
    except (OSError, ValueError):
        return
    if not Path(config_yaml).is_file():
        return
    import yaml

    now = (yaml.safe_load(Path(config_yaml).read_text(encoding="utf-8")) or {}).get("train", {})
    changed = changed_values(saved, now)
    if changed:
        step = checkpoint_step(checkpoint)
        note = "".join(f"# changed on resume at step {step} (train.allow_changes=true): {c}\n" for c in changed)
        write_text_atomic(config_yaml, Path(config_yaml).read_text(encoding="utf-8") + note)
