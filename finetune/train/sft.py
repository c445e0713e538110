"""What the training stage hands to peft and trl: the LoraConfig, the SFTConfig, and the checks of what this
machine can run (CUDA-only options, missing logger packages) once `device=auto` is resolved."""
from __future__ import annotations

from pathlib import Path

from finetune.errors import ConfigError
from finetune.models.load import resolve_dtype
from finetune.config import FinetuneConfig, PeftConfig
from finetune.config.train import CUDA_OPTIMIZERS


def lora_config(peft: PeftConfig):
    """peft.LoraConfig from our typed group. LoftQ starts as a plain LoRA: `init_adapter` replaces A and B."""
    from peft import LoraConfig

    init = peft.init
    init = {"true": True, "false": False, "loftq": True}.get(init, init)
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=peft.lora_dropout,
        target_modules=peft.target_modules if peft.target_modules == "all-linear" else list(peft.target_modules),
        use_rslora=peft.use_rslora,
        use_dora=peft.use_dora,
        modules_to_save=list(peft.modules_to_save) if peft.modules_to_save else None,
        # A tied model (Qwen2.5) has one matrix for embed_tokens and lm_head; training a copy of one of them
        # would silently untie it. peft keeps the trained copies tied when asked.
        ensure_weight_tying=bool(peft.modules_to_save),
        init_lora_weights=init,
        bias=peft.bias,
        task_type="CAUSAL_LM",
    )


def use_gradient_checkpointing(cfg: FinetuneConfig, device: str) -> bool:
    """train.gradient_checkpointing, or by default: on for quantized models on GPU (memory bound), off otherwise
    (on CPU it only adds a second forward pass, about 30% more time)."""
    if cfg.train.gradient_checkpointing is not None:
        return cfg.train.gradient_checkpointing
    return device == "cuda" and cfg.quant.is_quantized


def environment_problems(cfg: FinetuneConfig, device: str) -> list[str]:
    """What this machine cannot run: CUDA-only options once `device=auto` is resolved, and report_to
    loggers whose package is missing (transformers would fail at trainer setup with a traceback)."""
    import importlib.util

    problems = []
    if device != "cuda" and cfg.train.optim in CUDA_OPTIMIZERS:
        problems.append(f"train.optim={cfg.train.optim!r} needs CUDA (a bitsandbytes optimizer) but the device is "
                        f"{device}; use train.optim=adamw_torch")
    if device != "cuda" and cfg.peft.init == "loftq":
        problems.append(f"peft.init_lora_weights=loftq needs CUDA (peft computes LoftQ on the GPU) but the device "
                        f"is {device}; use peft.init_lora_weights=true or gaussian")
    if cfg.train.use_liger_kernel and device != "cuda":
        problems.append(f"train.use_liger_kernel=true needs CUDA (Liger's kernels are Triton) but the device is "
                        f"{device}; set train.use_liger_kernel=false")
    elif cfg.train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        problems.append("train.use_liger_kernel=true but the liger-kernel package is not installed: "
                        "pip install liger-kernel, or set train.use_liger_kernel=false")
    for name in cfg.train.report_to:
        if importlib.util.find_spec(name) is None:  # the package names equal the report_to names
            problems.append(f"train.report_to has {name!r} but the {name} package is not installed: "
                            f"pip install {name.replace('_', '-')}, or drop it from train.report_to")
    return problems


def check_environment(cfg: FinetuneConfig, device: str) -> None:
    """Raise ConfigError listing every `environment_problems`."""
    problems = environment_problems(cfg, device)
    if problems:
        raise ConfigError(problems)


def sft_config(cfg: FinetuneConfig, run_dir: Path, device: str, has_eval: bool):
    """trl SFTConfig from our train group. trl's own defaults (bf16=True, gradient_checkpointing=True) are
    overridden: both slow a CPU run down 2-3x for nothing."""
    import torch
    from trl import SFTConfig

    from finetune.distributed import launch_info

    t = cfg.train
    dtype = resolve_dtype(cfg.quant.compute_dtype, device)
    accumulation = t.gradient_accumulation_steps
    if t.global_batch_size is not None:  # divisibility was checked in preflight
        accumulation = t.global_batch_size // (launch_info().world_size * t.per_device_train_batch_size)
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",  # and always at the last step (transformers' DefaultFlowCallback)
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",  # under torchrun on CPU, ranks silently train apart without it
        # Every LoRA parameter takes part in each forward, so DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        deepspeed=t.deepspeed,
        activation_checkpointing=use_gradient_checkpointing(cfg, device),  # 5.24's name for gradient_checkpointing
        neftune_noise_alpha=t.neftune_noise_alpha,
        train_sampling_strategy=sampling_strategy(t),
        use_liger_kernel=t.use_liger_kernel,
        dataloader_num_workers=t.dataloader_num_workers,
        # TensorBoard is wired in `_tensorboard` (to write into <run>/tensorboard); the rest go through report_to.
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        max_length=cfg.data.max_length,
        packing=t.packing,
        packing_strategy="bfd",  # padding-free with per-sequence position ids: no cross-attention
        padding_free=t.packing,
        # Picks only which of transformers' printing callbacks is added; build_trainer removes both for ours.
        disable_tqdm=False,
    )


def sampling_strategy(t) -> str:
    """train.train_sampling_strategy with `auto` resolved. Without packing every micro-batch is padded to its
    longest row; grouping rows of similar length cut the padded tokens from 1.75x to 1.24x of the real ones and
    made the stock trl trainer 1.41x faster (benchmarks/train_throughput.py, log-normal lengths). Packed rows
    have no padding to save, and random order keeps each optimizer step's mix of lengths unbiased."""
    if t.train_sampling_strategy != "auto":
        return t.train_sampling_strategy
    return "random" if t.packing else "group_by_length"
