"""The training stage: trl's SFTTrainer on our pre-tokenized, pre-masked rows, with a LoRA adapter."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.model import load_base_model, resolve_device, resolve_dtype
from finetune.runs import peak_memory_mb, write_json_atomic
from finetune.schema import FinetuneConfig, PeftConfig

log = logging.getLogger("finetune.train")


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    first_loss: float | None
    last_loss: float | None
    seconds: float


def lora_config(peft: PeftConfig):
    """peft.LoraConfig from our typed group."""
    from peft import LoraConfig

    init = peft.init_lora_weights
    if isinstance(init, str) and init.lower() in ("true", "false"):
        init = init.lower() == "true"
    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=peft.lora_dropout,
        target_modules=peft.target_modules if peft.target_modules == "all-linear" else list(peft.target_modules),
        use_rslora=peft.use_rslora,
        use_dora=peft.use_dora,
        modules_to_save=list(peft.modules_to_save) if peft.modules_to_save else None,
        init_lora_weights=init,
        bias=peft.bias,
        task_type="CAUSAL_LM",
    )


def sft_config(cfg: FinetuneConfig, run_dir: Path, device: str, has_eval: bool):
    """trl SFTConfig from our train group. trl's own defaults (bf16=True, gradient_checkpointing=True) are
    overridden: both slow a CPU run down 2-3x for nothing."""
    import torch
    from trl import SFTConfig

    t = cfg.train
    dtype = resolve_dtype(cfg.quant.compute_dtype, device)
    ckpt = t.gradient_checkpointing
    if ckpt is None:  # on for quantized models on GPU (memory bound), off on CPU (compute bound)
        ckpt = device == "cuda" and cfg.quant.is_quantized
    eval_strategy = "steps" if (has_eval and t.eval_steps) else "no"
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",  # under torchrun on CPU, ranks silently train apart without it
        gradient_checkpointing=ckpt,
        neftune_noise_alpha=t.neftune_noise_alpha,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=list(t.report_to) or "none",
        max_length=cfg.data.max_length,
        packing=t.packing,
        packing_strategy="bfd",  # padding-free with per-sequence position ids: no cross-attention
        padding_free=t.packing,
        disable_tqdm=False,
    )


def train(cfg: FinetuneConfig, splits, tokenizer, run_dir: Path) -> TrainResult:
    """Train a LoRA adapter on `splits.train`; save it (PEFT format) to `run_dir/adapter`.

    Rows arrive tokenized with an `assistant_masks` column; trl turns that into labels (-100 elsewhere)
    and packs the rows, so we do not re-implement either.
    """
    import torch
    from trl import SFTTrainer

    from finetune.callbacks import MetricsCallback

    device = resolve_device(cfg.device)
    model = load_base_model(cfg.model, cfg.quant, device)
    has_eval = splits.val is not None and len(splits.val) > 0
    args = sft_config(cfg, run_dir, device, has_eval)
    metrics = MetricsCallback(run_dir / "metrics.jsonl")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.val if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.peft),
        callbacks=[metrics],
    )
    if resolve_dtype(cfg.quant.compute_dtype, device) == torch.float32:
        # trl casts LoRA weights of quantized models to bf16 (the QLoRA paper's GPU recipe). With fp32
        # compute (the CPU default) that makes every step 2-3x slower, so cast them back before the
        # optimizer is built.
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if has_eval else None
    if eval_loss is not None:
        metrics.write({"step": trainer.state.global_step, "eval_loss": eval_loss})

    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter + tokenizer (with the chat template used in training)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    write_json_atomic(adapter_dir / "provenance.json", {
        "base_model": cfg.model.name_or_path,
        "base_model_path": str(trainer.model.peft_config["default"].base_model_name_or_path),
        "revision": cfg.model.revision,
        "quant": cfg.quant.method,
        "lora": {"r": cfg.peft.r, "alpha": cfg.peft.lora_alpha, "target_modules": cfg.peft.target_modules},
        "config_sha256": _config_hash(run_dir),
    })
    result = TrainResult(
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        train_loss=float(out.training_loss),
        eval_loss=eval_loss,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        seconds=seconds,
    )
    log.info("trained %d steps in %.1fs; loss %s -> %s; peak memory %.0f MB", result.steps, seconds,
             result.first_loss, result.last_loss, peak_memory_mb())
    del trainer, model
    return result


def _config_hash(run_dir: Path) -> str | None:
    import hashlib

    path = run_dir / "config.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
