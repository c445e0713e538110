"""Train group. Key names follow transformers' TrainingArguments wherever one exists."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class TrainConfig:
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = use num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup: steps (>= 1) or a fraction of all steps (< 1)."})
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Eval loss every N steps; None = at the end only."})
    packing: bool = field(default=True, metadata={"help": "Padding-free bfd packing (trl): no padding, no cross-attention."})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "None = on for quantized models on GPU, off on CPU."}
    )
    neftune_noise_alpha: Optional[float] = None
    dataloader_num_workers: int = 0
    report_to: List[str] = field(default_factory=list, metadata={"help": "e.g. [tensorboard], [wandb], [mlflow]."})
    resume: str = field(default="auto", metadata={"help": "auto | never | <checkpoint dir>"})
    plan_only: bool = field(default=False, metadata={"help": "Print the memory plan and exit."})

    def problems(self) -> list[str]:
        out = []
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(f"train.max_steps={self.max_steps}: use a positive number of steps, or -1 for epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            out.append(f"train.num_train_epochs={self.num_train_epochs}: must be positive when max_steps=-1")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate={self.learning_rate}: must be positive")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "save_total_limit"):
            if getattr(self, key) <= 0:
                out.append(f"train.{key}={getattr(self, key)}: must be a positive integer")
        if self.eval_steps is not None and self.eval_steps <= 0:
            out.append(f"train.eval_steps={self.eval_steps}: must be positive, or null for end-only eval")
        if self.warmup_steps < 0:
            out.append(f"train.warmup_steps={self.warmup_steps}: use a step count >= 1 or a fraction in [0, 1)")
        if self.optim not in OPTIMIZERS:
            out.append(f"train.optim={self.optim!r}: unknown optimizer; use one of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            out.append(f"train.lr_scheduler_type={self.lr_scheduler_type!r}: use one of {', '.join(SCHEDULERS)}")
        return out
