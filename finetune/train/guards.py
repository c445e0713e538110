"""Guards around the training loop: stop on a non-finite loss or gradient, never train past max_steps.

Non-finite values: with train.learning_rate=inf the first step is finite and every weight after it is NaN, so
watching the logged loss alone saves a NaN adapter when max_steps=1 (and logging_steps=5 hides four NaN steps).
The guard therefore also checks the trainable weights after every optimizer step: one device sync per step,
LoRA weights only (30 M values for Qwen2.5-3B r=16, well under 1 ms on a GPU). It runs in on_step_end, before
the Trainer's save of that step, so no checkpoint holds the bad weights.

max_steps: transformers 5.24 resumes a checkpoint of step max_steps by running the loop once more and only then
seeing global_step >= max_steps, i.e. one extra optimizer step (the adapter differed by 3e-3). `already_trained`
tells train() to restore the checkpoint instead of calling Trainer.train.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.train.guards")


class NonFiniteTraining(FinetuneError):
    """The loss or the gradient norm became NaN / infinite; the message says at which step and what to try."""


def advice(args) -> str:
    return (f"Try a lower train.learning_rate (now {args.learning_rate:g}), keep gradient clipping on "
            f"(train.max_grad_norm, now {args.max_grad_norm:g}), quant.compute_dtype=float32 or bfloat16 instead "
            "of float16, and check the data rows of that step; the last good checkpoint is the newest under "
            f"{args.output_dir}")


class NonFiniteGuard(TrainerCallback):
    """Raise NonFiniteTraining as soon as a logged loss / grad norm or a trainable weight is not finite."""

    def __init__(self):
        self._params: Optional[list] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if not self._params:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self._params]).all()
        if not bool(finite):
            raise NonFiniteTraining(
                f"training diverged at step {state.global_step}: the adapter weights became NaN or infinite after "
                f"this optimizer step (last logged loss: {_last_loss(state)}); nothing of this step was saved. "
                + advice(args))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTraining(
                    f"training diverged at step {state.global_step}: {key}={value} (loss {logs.get('loss')}, "
                    f"grad_norm {logs.get('grad_norm')}); stopped before saving this step. " + advice(args))


    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Weights can stay finite and still overflow in the forward: lr=1e30 gave LoRA weights near 1e27, finite in
        # fp32, whose product B @ A is inf. The eval loss (periodic, and the final one train() computes before the
        # adapter is saved) sees that.
        value = (metrics or {}).get("eval_loss")
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteTraining(
                f"training diverged by step {state.global_step}: eval_loss={value} on the validation rows (last "
                f"training loss {_last_loss(state)}); the adapter was not saved. " + advice(args))


def _last_loss(state) -> Any:
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    return losses[-1] if losses else "none yet"


def checkpoint_step(checkpoint: Path) -> int:
    """global_step recorded in a checkpoint's trainer_state.json (-1 when unreadable)."""
    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def already_trained(resume_from: Optional[Path], max_steps: int) -> bool:
    """True when the checkpoint to resume from already reached train.max_steps (nothing left to train)."""
    return resume_from is not None and max_steps > 0 and checkpoint_step(resume_from) >= max_steps


def restore_finished(trainer, checkpoint: Path) -> None:
    """Load a finished checkpoint's adapter weights and trainer state without running a training step."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's own loader (adapter weights for a PeftModel)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    log.info("%s already reached train.max_steps=%d: adapter restored from it, no step trained", checkpoint,
             trainer.state.global_step)


def finished_run(run_dir: Path, max_steps: int) -> Optional[dict]:
    """The provenance of <run>/adapter when it was published after max_steps steps (the run is finished)."""
    path = Path(run_dir) / "adapter" / "provenance.json"
    if max_steps <= 0 or not path.is_file():
        return None
    try:
        prov = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return prov if isinstance(prov, dict) and prov.get("steps") == max_steps else None


# Keys that say how to start, not how to train: changing them on resume changes nothing that was trained.
NOT_TRAINING_VALUES = ("resume", "plan_only", "overwrite", "allow_changes", "report_to", "dataloader_num_workers")


def changed_values(saved: dict, now: dict) -> list[str]:
    """`train.<key>: old -> new` for every training value that differs between a checkpoint and this config."""
    return [f"train.{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in NOT_TRAINING_VALUES and saved.get(k) != v]


def check_changed_values(checkpoint: Path, saved: dict, now: dict, allowed: bool) -> list[str]:
    """Refuse to resume with changed training values unless train.allow_changes=true (then log and return them).

    Raises:
        FinetuneError: listing every differing key with both values.
    """
    changed = changed_values(saved, now)
    if changed and not allowed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise FinetuneError(
            f"cannot resume from {checkpoint}: these training values differ from the ones it was trained with:\n"
            f"{lines}\nRun with the checkpoint's values, pass train.allow_changes=true to continue with the new ones "
            "(config.yaml then records the change and its step), or start over with train.resume=never "
            "train.overwrite=true")
    if changed:
        log.warning("resuming from %s with changed training values: %s", checkpoint, "; ".join(changed))
    return changed


def model_problems(cfg) -> list[str]:
    """Checks that need the model's config.json or installed packages, made at start instead of late (preflight):
    flash_attention_2 without flash-attn failed inside from_pretrained, a LoRA rank above the model's width was
    accepted, and a base with only .bin weights failed at merge, after all training."""
    import importlib.util

    from finetune.models.load import load_architecture, model_path

    out = []
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        out.append("model.attn_implementation=flash_attention_2 needs the flash-attn package (CUDA only): pip "
                   "install flash-attn, or use model.attn_implementation=sdpa")
    try:
        arch = load_architecture(cfg.model)
    except FinetuneError:
        arch = {}
    width = arch.get("hidden_size")
    if isinstance(width, int) and cfg.peft.r > width:
        out.append(f"peft.r={cfg.peft.r} exceeds the model's hidden size {width}: a LoRA rank above the layer "
                   f"width adds parameters without adding rank; use r <= {width} (8-64 is usual)")
    if cfg.merge.enabled and not cfg.model.is_embedded and not cfg.model.gguf_file:
        folder = Path(model_path(cfg.model))
        if folder.is_dir() and not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
            out.append(f"model.name_or_path={cfg.model.name_or_path!r} has only .bin weights; merging (merge.enabled="
                       "true) reads safetensors: convert them first (load and save_pretrained(safe_serialization="
                       "True)), or set merge.enabled=false")
    return out
