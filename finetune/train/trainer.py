"""The training stage: trl's SFTTrainer on our pre-tokenized, pre-masked rows, with a LoRA adapter.

What we add to trl/transformers: k-bit preparation and a target-module check before peft runs, fp32
adapters, PiSSA/LoftQ initialisation, atomic checkpoints (finetune.train.checkpoint), a clean stop on
SIGTERM/Ctrl-C, label tokens per second in the logs, and the final adapter written atomically.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError
from finetune.models.load import check_target_modules, load_base_model, model_path, resolve_device, resolve_dtype
from finetune.files import peak_memory_mb, write_json_atomic
from finetune.config import FinetuneConfig, PeftConfig
from finetune.config.train import CUDA_OPTIMIZERS

log = logging.getLogger("finetune.train.trainer")


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss: float
    eval_loss: float | None
    first_loss: float | None
    last_loss: float | None
    seconds: float
    resumed_from: Path | None = None
    label_tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    rank_checksums: list[str] = field(default_factory=list)  # SHA-256 of the adapter on each process


class TrainingStopped(FinetuneError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; says how to resume."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, run_dir: Path):
        self.signal_name, self.step, self.checkpoint, self.run_dir = signal_name, step, checkpoint, run_dir
        super().__init__(
            f"training stopped by {signal_name} at step {step}; checkpoint saved: {checkpoint}. To resume, run the "
            f"same command with hydra.run.dir={run_dir} (train.resume=auto continues from the last checkpoint)")


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
        per_device_eval_batch_size=t.per_device_eval_batch_size,
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
        disable_tqdm=False,  # the progress bar (with ETA) also when logging is quiet
    )


def sampling_strategy(t) -> str:
    """train.train_sampling_strategy with `auto` resolved. Without packing every micro-batch is padded to its
    longest row; grouping rows of similar length cut the padded tokens from 1.75x to 1.24x of the real ones and
    made the stock trl trainer 1.41x faster (benchmarks/train_throughput.py, log-normal lengths). Packed rows
    have no padding to save, and random order keeps each optimizer step's mix of lengths unbiased."""
    if t.train_sampling_strategy != "auto":
        return t.train_sampling_strategy
    return "random" if t.packing else "group_by_length"


@lru_cache(maxsize=1)
def trainer_class():
    """SFTTrainer + atomic checkpoints + label tokens/s in each training log record (built lazily: importing
    trl costs seconds, and `finetune train --help` should not pay them)."""
    import torch
    from trl import SFTTrainer

    from finetune.train.checkpoint import save_atomically

    class FinetuneTrainer(SFTTrainer):
        def __init__(self, *args, checkpoint_meta: dict, **kwargs):
            super().__init__(*args, **kwargs)
            self.checkpoint_meta = checkpoint_meta  # what a resume must agree with (finetune.train.checkpoint)
            self._label_tokens = None  # label tokens since the last log, a device tensor (no sync per step)
            self._label_tokens_total = 0
            self._last_log_t: float | None = None
            self.label_tokens_per_s: list[float] = []

        def _save_checkpoint(self, model, trial):
            save_atomically(self, super()._save_checkpoint, model, trial, self.checkpoint_meta)

        def training_step(self, model, inputs, *args, **kwargs):
            if self._last_log_t is None:
                self._last_log_t = time.perf_counter()
            labels = inputs.get("labels")
            if labels is not None:
                n = (labels != -100).sum()
                self._label_tokens = n if self._label_tokens is None else self._label_tokens + n
            return super().training_step(model, inputs, *args, **kwargs)

        def log(self, logs, start_time=None):
            if "loss" in logs and self._last_log_t is not None:
                count = self._label_tokens if self._label_tokens is not None else torch.zeros((), dtype=torch.long)
                count = self.accelerator.reduce(count.to(self.args.device), reduction="sum").item()  # all ranks
                now = time.perf_counter()
                rate = count / max(now - self._last_log_t, 1e-9)
                self._label_tokens_total += count
                logs["label_tokens"] = self._label_tokens_total
                logs["label_tokens_per_s"] = round(rate, 1)
                self.label_tokens_per_s.append(rate)
                self._label_tokens, self._last_log_t = None, now
            super().log(logs, start_time)

    return FinetuneTrainer


def build_trainer(cfg: FinetuneConfig, splits, tokenizer, run_dir: Path, device: str, *, model=None):
    """Base model (quantized, k-bit prepared) + LoRA + SFTTrainer, ready to train. `model`: a base the caller
    already loaded with `load_base_model(cfg.model, cfg.quant, device)` (benchmarks/memory.py measures the
    loading apart), else it is loaded here."""
    import torch
    from transformers import set_seed

    from finetune.train.callbacks import MetricsCallback
    from finetune.train.checkpoint import checkpoint_meta

    set_seed(cfg.train.seed)  # LoRA init (and pissa_niter's randomized SVD) happen before the Trainer seeds
    if model is None:
        model = load_base_model(cfg.model, cfg.quant, device)
    check_target_modules(model, cfg.peft, cfg.model.name_or_path)
    # A quantized base arrives frozen with fp32 norms (finetune.models.load.prepare_quantized_base); checkpointing is
    # left to the Trainer (activation_checkpointing) so it is configured in one place.
    has_eval = splits.val is not None and len(splits.val) > 0
    trainer = trainer_class()(
        model=model,
        args=sft_config(cfg, run_dir, device, has_eval),
        train_dataset=splits.train,
        eval_dataset=splits.val if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.peft),
        callbacks=[MetricsCallback(run_dir / "metrics.jsonl"), *_tensorboard(cfg, run_dir)],
        checkpoint_meta=checkpoint_meta(cfg),
    )
    init_adapter(trainer, cfg, run_dir)
    # trl casts LoRA weights of quantized models to bf16 (the QLoRA paper's recipe). We keep them fp32: with
    # fp32 compute (CPU) bf16 weights make each step 2-3x slower, and on GPU an AdamW update below 2^-8 of a
    # bf16 weight rounds away; fp32 adapters are also what the memory plan counts (30 M params: +60 MB).
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainer


def _tensorboard(cfg: FinetuneConfig, run_dir: Path) -> list:
    if "tensorboard" not in cfg.train.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    # Its default is <output_dir>/runs/<time>, i.e. inside checkpoints/; the run directory keeps it apart.
    cb.logging_dir = str(run_dir / "tensorboard")
    return [cb]


def init_adapter(trainer, cfg: FinetuneConfig, run_dir: Path) -> None:
    """PiSSA: keep the initial adapter, so the final one can be converted to a plain LoRA of the original base.
    LoftQ: replace lora_A/lora_B by the SVD of the 4-bit quantization error (peft, on CUDA)."""
    init = cfg.peft.init
    if init.startswith("pissa"):
        init_dir = run_dir / "pissa_init"
        if trainer.args.should_save and not (init_dir / "adapter_model.safetensors").is_file():
            trainer.model.save_pretrained(str(init_dir))  # deterministic (seeded), so a resume may rewrite it
    elif init == "loftq":
        from peft import replace_lora_weights_loftq

        local = Path(model_path(cfg.model))
        replace_lora_weights_loftq(trainer.model, model_path=str(local) if local.is_dir() else None)


def save_adapter(trainer, cfg: FinetuneConfig, run_dir: Path, extra: dict) -> Path:
    """Write <run>/adapter (PEFT adapter + tokenizer + chat template + provenance.json) atomically.

    A PiSSA adapter is saved converted (peft's path_initial_model_for_weight_conversion): rank 2r, relative
    to the original base weights, so merge and eval load it onto the unmodified base like any LoRA.
    """
    import shutil
    import tempfile

    from finetune.train.checkpoint import publish_dir

    adapter_dir = run_dir / "adapter"
    if trainer.args.should_save:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=run_dir))
        try:
            if cfg.peft.init.startswith("pissa"):
                trainer.model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(
                    run_dir / "pissa_init"))
                trainer.processing_class.save_pretrained(str(tmp))
            else:
                trainer.save_model(str(tmp))  # adapter + tokenizer (with the chat template used in training)
            peft_cfg = trainer.model.peft_config["default"]
            write_json_atomic(tmp / "provenance.json", {
                "base_model": cfg.model.name_or_path,
                "base_model_path": str(peft_cfg.base_model_name_or_path),
                "revision": cfg.model.revision,
                "quant": cfg.quant.method,
                "lora": {"r": cfg.peft.r, "alpha": cfg.peft.lora_alpha, "target_modules": cfg.peft.target_modules,
                         "use_dora": cfg.peft.use_dora, "use_rslora": cfg.peft.use_rslora,
                         "init_lora_weights": cfg.peft.init, "modules_to_save": cfg.peft.modules_to_save},
                "config_sha256": _config_hash(run_dir),
                **extra,
            })
            publish_dir(tmp, adapter_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return adapter_dir


def train(cfg: FinetuneConfig, splits, tokenizer, run_dir: Path, *, resume_from: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on `splits.train`, optionally continuing from checkpoint `resume_from`; save the
    adapter (PEFT format) to `run_dir/adapter`.

    Rows arrive tokenized with an `assistant_masks` column; trl turns that into labels (-100 elsewhere)
    and packs the rows, so we do not re-implement either.

    Raises:
        TrainingStopped: SIGTERM/SIGINT arrived; a checkpoint of the last finished step was saved.
        ConfigError: an option the resolved device cannot run, or an unknown target module.
    """
    from finetune.train.callbacks import StopOnSignal
    from finetune.train.checkpoint import complete_checkpoints

    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    check_environment(cfg, device)
    trainer = build_trainer(cfg, splits, tokenizer, run_dir, device)
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    started = time.perf_counter()
    with stopper:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if stopper.received:
        found = complete_checkpoints(run_dir / "checkpoints")
        raise TrainingStopped(stopper.received, trainer.state.global_step, found[-1] if found else None, run_dir)

    eval_loss = None
    if trainer.eval_dataset is not None:
        evals = [r for r in trainer.state.log_history if "eval_loss" in r]
        if evals and evals[-1]["step"] == trainer.state.global_step:
            eval_loss = evals[-1]["eval_loss"]  # the periodic eval already ran at the last step
        else:
            eval_loss = trainer.evaluate()["eval_loss"]
    _close_tensorboard(trainer)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    rates = trainer.label_tokens_per_s
    result = TrainResult(
        adapter_dir=run_dir / "adapter",
        steps=trainer.state.global_step,
        train_loss=float(out.training_loss),
        eval_loss=eval_loss,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        seconds=seconds,
        resumed_from=resume_from,
        label_tokens_per_s=round(sum(rates) / len(rates), 1) if rates else None,
        peak_memory_mb=round(peak_memory_mb(), 1),
    )
    result.rank_checksums = check_ranks_agree(trainer)
    save_adapter(trainer, cfg, run_dir, {"steps": result.steps,
                                         "resumed_from": str(resume_from) if resume_from else None})
    log.info("trained %d steps in %.1fs; loss %s -> %s; peak memory %.0f MB", result.steps, seconds,
             result.first_loss, result.last_loss, result.peak_memory_mb)
    del trainer
    return result


def check_ranks_agree(trainer) -> list[str]:
    """Every DDP rank must end with the same adapter. If they differ, the ranks trained apart (on a CPU
    machine, torchrun without use_cpu=True does that with no error), so stop before anything is saved."""
    from finetune.distributed import gather_strings, launch_info, trainable_checksum

    sums = gather_strings(trainable_checksum(trainer.model))
    if launch_info().engine == "ddp" and len(set(sums)) > 1:
        raise FinetuneError(
            f"the {len(sums)} processes ended with different adapter weights (checksums "
            f"{', '.join(x[:12] for x in sums)}): gradients were not synchronised, so the run is not one "
            "data-parallel run. Check the launcher and device settings (on CPU: device=cpu)."
        )
    return sums


def _close_tensorboard(trainer) -> None:
    # TensorBoardCallback closes its writer at train end, but the final evaluate() opens a new one; flush it.
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
            cb.tb_writer.close()
            cb.tb_writer = None


def _config_hash(run_dir: Path) -> str | None:
    import hashlib

    path = run_dir / "config.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
