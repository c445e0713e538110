"""Train group. Key names follow transformers' TrainingArguments wherever one exists."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
CUDA_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")  # bitsandbytes optimizers
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
SAMPLING_STRATEGIES = ("auto", "random", "sequential", "group_by_length")  # batch_rebalance: multi-GPU only
# report_to targets that transformers' integrations know; TensorBoard is on by default, the others are opt-in
# because they need an account or a server.
REPORTERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "swanlab")


@dataclass
class TrainConfig:
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = use num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Packed rows per micro-batch (one forward)."})
    # null = per_device_train_batch_size. With packing each eval row is already data.max_length tokens, and
    # trl's padding-free collator joins a batch into one row: the former default of 8 scored the demo's 70 val
    # rows as one 11,272-token forward, 13-23 s and up to +4.8 GB of RSS after training on 2 cores, against
    # 8 s and no growth as 6 rows of 2,048 (measured 2026-12-03, SmolLM2-135M, AMX Xeon).
    per_device_eval_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Packed rows per eval forward; null = per_device_train_batch_size."})
    gradient_accumulation_steps: int = 4
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps (>= 1) or a fraction of all (< 1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": " | ".join(SCHEDULERS)})
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 = no clipping."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch; 8-bit/paged AdamW need CUDA."})
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps (and always at the end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Eval loss every N steps (and at the end)."})
    packing: bool = field(default=True, metadata={"help": "Padding-free bfd packing (trl), no cross-attention."})
    per_document_attention: bool = field(default=True, metadata={
        "help": "With packing and sdpa attention, attend within each packed document only (model attention "
                "sdpa_packed): 1.74x at 2,048-token rows on CPU, the same losses."})
    share_prefixes: bool = field(default=True, metadata={
        "help": "With per-document attention, compute a prompt prefix that documents of a packed row share once "
                "(finetune/train/shared_prefix.py): same labels and losses, fewer tokens."})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "None = on for quantized models on GPU, off otherwise."}
    )
    train_sampling_strategy: str = field(default="auto", metadata={
        "help": "Order of training rows (TrainingArguments): auto = group_by_length when packing=false (rows of "
                "similar length share a micro-batch, less padding), random when packing; or random, sequential, "
                "group_by_length."})
    use_liger_kernel: bool = field(default=False, metadata={
        "help": "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA only; pip install liger-kernel). The "
                "loss already runs in trl's fused head, so Liger's fused cross-entropy stays off."})
    neftune_noise_alpha: Optional[float] = field(default=None, metadata={"help": "NEFTune noise (e.g. 5); null = off."})
    loraplus_lr_ratio: Optional[float] = field(default=None, metadata={
        "help": "LoRA+: the B matrices learn at learning_rate x this ratio, the A matrices at learning_rate "
                "(peft's create_loraplus_optimizer; the paper suggests 16). null = one learning rate."})
    dataloader_num_workers: int = 0
    report_to: List[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Loggers besides metrics.jsonl: tensorboard (default), wandb, mlflow, ...; [] = none."},
    )
    resume: str = field(default="auto", metadata={
        "help": "auto (continue from the last complete checkpoint of this run directory, if any) | never | "
                "<checkpoint dir or run dir>"})
    plan_only: bool = field(default=False, metadata={"help": "Print the memory plan and exit."})
    overwrite: bool = field(default=False, metadata={
        "help": "With train.resume=never: delete the run already in this directory and start over (refused "
                "otherwise)."})
    allow_changes: bool = field(default=False, metadata={
        "help": "Resume although training values differ from the checkpoint's (refused otherwise); config.yaml "
                "then records what changed at which step."})
    global_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Rows per optimizer step over all processes; sets gradient_accumulation_steps = global / (world "
                "size x per_device_train_batch_size). null = use gradient_accumulation_steps as given."})
    deepspeed: Optional[str] = field(default=None, metadata={
        "help": "DeepSpeed JSON config (TrainingArguments.deepspeed); or launch with an accelerate DeepSpeed config."})

    def problems(self) -> list[str]:
        out = []
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            out.append(f"train.global_batch_size={self.global_batch_size}: must be positive (or null)")
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(f"train.max_steps={self.max_steps}: use a positive number of steps, or -1 for epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            out.append(f"train.num_train_epochs={self.num_train_epochs}: must be positive when max_steps=-1")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate={self.learning_rate}: must be positive")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "save_total_limit"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                out.append(f"train.{key}={getattr(self, key)}: must be a positive integer")
        if self.eval_steps is not None and self.eval_steps <= 0:
            out.append(f"train.eval_steps={self.eval_steps}: must be positive, or null for end-only eval")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            out.append(f"train.warmup_steps={self.warmup_steps}: use a step count >= 1 or a fraction in [0, 1)")
        if self.optim not in OPTIMIZERS:
            out.append(f"train.optim={self.optim!r}: unknown optimizer; use one of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            out.append(f"train.lr_scheduler_type={self.lr_scheduler_type!r}: use one of {', '.join(SCHEDULERS)}")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay={self.weight_decay}: must be >= 0")
        if self.max_grad_norm < 0:
            out.append(f"train.max_grad_norm={self.max_grad_norm}: must be >= 0 (0 turns clipping off)")
        if self.seed < 0:
            out.append(f"train.seed={self.seed}: must be >= 0")
        if self.neftune_noise_alpha is not None and self.neftune_noise_alpha <= 0:
            out.append(f"train.neftune_noise_alpha={self.neftune_noise_alpha}: must be positive (the paper uses "
                       "5-15), or null for no noise")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1:
            out.append(f"train.loraplus_lr_ratio={self.loraplus_lr_ratio}: must be >= 1 (B's rate over A's; the "
                       "LoRA+ paper uses 16), or null for one learning rate")
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            out.append(f"train.train_sampling_strategy={self.train_sampling_strategy!r}: use one of "
                       f"{', '.join(SAMPLING_STRATEGIES)}")
        if self.dataloader_num_workers < 0:
            out.append(f"train.dataloader_num_workers={self.dataloader_num_workers}: must be >= 0")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            out.append(f"train.report_to has {unknown}: use a list of {', '.join(REPORTERS)} (or [] for "
                       "metrics.jsonl only)")
        if not self.resume.strip():
            out.append("train.resume is empty: use auto, never, or a checkpoint / run directory")
        return out
