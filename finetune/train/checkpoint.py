"""Checkpoints: written atomically, found again for `train.resume`, refused when made for another model.

transformers 5.24 writes `checkpoint-N/` file by file in place (model, optimizer, scheduler, RNG, trainer
state), so a crash mid-save leaves a directory that looks like a checkpoint but is not one, and
`get_last_checkpoint` would pick it. We let the Trainer write everything into a staging directory
(`.tmp-checkpoint-N/`, which no checkpoint pattern matches), flush it to disk, then rename it into place:
a reader sees the previous checkpoint or the new one, whole. Resuming itself (optimizer, scheduler, RNG,
data position) is transformers' `resume_from_checkpoint`; we only choose the directory and check it fits.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from finetune.errors import FinetuneError
from finetune.files import fsync_dir, publish_folder, write_json_atomic, write_text_atomic
from finetune.config import FinetuneConfig
from finetune.train.manifest import manifest_problem, newest_verified, write_manifest

log = logging.getLogger("finetune.train.checkpoint")

STAGING_PREFIX = ".tmp-"  # staging dirs: .tmp-checkpoint-N (hidden; `checkpoint-*` globs skip them)
META_NAME = "finetune_checkpoint.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # enough to score a checkpoint (eval)
REQUIRED_FILES = ("trainer_state.json", *ADAPTER_FILES, "optimizer.pt", "scheduler.pt")  # to resume from it
LORA_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save", "bias")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_meta(cfg: FinetuneConfig) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the base model and the LoRA shape (+ train keys)."""
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.revision": cfg.model.revision,
        "quant.method": cfg.quant.method,
        **{f"peft.{k}": getattr(cfg.peft, k) for k in LORA_KEYS},
        "peft.init_lora_weights": cfg.peft.init,  # PiSSA rewrites the base weights, so it must match too
        "train": dataclasses.asdict(cfg.train),
    }


def save_atomically(trainer, save: Callable[[Any, Any], None], model, trial, meta: dict[str, Any]) -> Path:
    """Run the Trainer's own checkpoint save into a staging directory, then rename the result into place.

    Args:
        trainer: the transformers Trainer (its args.output_dir is pointed at the staging dir meanwhile).
        save: the Trainer's original `_save_checkpoint(model, trial)`.
        meta: written as finetune_checkpoint.json, for the resume compatibility check.
    Returns:
        The published checkpoint directory.
    """
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    root = Path(args.output_dir)
    name = f"checkpoint-{trainer.state.global_step}"
    staging = root / f"{STAGING_PREFIX}{name}"
    final = root / name
    args.output_dir = str(staging)  # every rank writes its shards / RNG state there, as it would into root
    try:
        save(model, trial)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # disk full or killed mid-save: the last good checkpoint stays
        raise
    finally:
        args.output_dir = str(root)
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        write_json_atomic(staging / name / META_NAME, meta)
        write_manifest(staging / name)  # last: a checkpoint verifies only when whole (finetune.train.manifest)
        _fsync_tree(staging / name)  # survive a power loss too, not only a killed process
        publish_folder(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)  # trl's model card README is all that is left there
        if trainer.state.best_model_checkpoint and STAGING_PREFIX in trainer.state.best_model_checkpoint:
            trainer.state.best_model_checkpoint = str(final)
        rotate_checkpoints(str(root), args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=False)
        log.info("checkpoint saved: %s", final)
    trainer.accelerator.wait_for_everyone()
    return final


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def step_of(checkpoint: Path) -> int:
    m = _CHECKPOINT.match(Path(checkpoint).name)
    return int(m.group(1)) if m else -1


def missing_files(checkpoint: Path, needs: tuple[str, ...] = REQUIRED_FILES) -> list[str]:
    return [f for f in needs if not (checkpoint / f).is_file()]


def complete_checkpoints(root: Path, needs: tuple[str, ...] = REQUIRED_FILES) -> list[Path]:
    """Checkpoint directories under `root` with every file in `needs` (default: what resume needs; eval
    passes ADAPTER_FILES, so a checkpoint whose optimizer state was deleted to save space still scores),
    oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and _CHECKPOINT.match(path.name):
            missing = missing_files(path, needs)
            if missing:  # e.g. written by a version that saved in place, then killed
                log.warning("skipping incomplete checkpoint %s (missing %s)", path, ", ".join(missing))
            else:
                found.append(path)
    return sorted(found, key=step_of)


def clean_staging(root: Path) -> list[Path]:
    """Remove what a crash mid-save left behind (.tmp-* directories); return them."""
    leftovers = sorted(p for p in root.glob(f"{STAGING_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    for p in leftovers:
        log.warning("removing %s: a checkpoint save that did not finish", p)
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `train.resume` names: auto = the last complete one of this run (or None), never = None,
    a path = that checkpoint, or the last complete one of that run directory.

    Raises:
        FinetuneError: the path is not a complete checkpoint nor a run directory with one.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return newest_verified(complete_checkpoints(Path(run_dir) / "checkpoints"))
    path = Path(resume).expanduser()
    if path.is_dir() and _CHECKPOINT.match(path.name):
        missing = missing_files(path)
        if missing:
            raise FinetuneError(f"train.resume={resume}: incomplete checkpoint (missing {', '.join(missing)}); "
                                "point at an earlier checkpoint-N or use train.resume=never")
        problem = manifest_problem(path)
        if problem:
            raise FinetuneError(f"train.resume={resume}: the checkpoint does not verify: {problem}; point at an "
                                "earlier checkpoint-N, or use train.resume=auto to take the newest good one")
        return path
    for root in (path / "checkpoints", path):
        found = newest_verified(complete_checkpoints(root))
        if found:
            return found
    raise FinetuneError(f"train.resume={resume}: no complete checkpoint-N there; give a checkpoint directory or a "
                        "run directory that has checkpoints/, or use train.resume=auto / never")


def check_compatible(checkpoint: Path, cfg: FinetuneConfig) -> None:
    """Refuse a checkpoint made for another base model or LoRA shape; warn about changed train keys.

    Raises:
        FinetuneError: listing every key that differs, with both values.
    """
    meta_path = checkpoint / META_NAME
    if not meta_path.is_file():
        raise FinetuneError(f"train.resume: {checkpoint} has no {META_NAME} (an older finetune or another tool wrote "
                            "it), so its base model and LoRA shape cannot be checked; start over with "
                            "train.resume=never")
    saved = json.loads(meta_path.read_text(encoding="utf-8"))
    now = checkpoint_meta(cfg)
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in now.items()
             if k != "train" and saved.get(k) != v]
    if diffs:
        lines = "\n".join(f"  - {d}" for d in diffs)
        raise FinetuneError(f"cannot resume from {checkpoint}: it was made with a different base model or LoRA "
                            f"shape:\n{lines}\nRun with the settings it was made with, or start over with "
                            "train.resume=never (or another hydra.run.dir)")
    from finetune.train.guards import check_changed_values

    check_changed_values(checkpoint, saved.get("train", {}), now["train"], cfg.train.allow_changes)


def trim_metrics(path: Path, step: int) -> int:
    """Drop metrics.jsonl records after `step` (logged by the interrupted run past its last checkpoint), so the
    resumed run's records follow on without duplicates. Returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)
