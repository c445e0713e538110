"""The training stage: trl's SFTTrainer on our pre-tokenized, pre-masked rows, with a LoRA adapter.

What we add to trl/transformers: k-bit preparation and a target-module check before peft runs, fp32
adapters, PiSSA/LoftQ initialisation and the final adapter written atomically (finetune.train.adapter),
atomic checkpoints (finetune.train.checkpoint), a clean stop on SIGTERM/Ctrl-C, label tokens per second in
the logs, and one readable progress bar (finetune.train.callbacks). The LoraConfig / SFTConfig and the
device checks are in finetune.train.sft.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.load import check_target_modules, load_base_model, resolve_device
from finetune.files import peak_memory_mb
from finetune.config import FinetuneConfig
from finetune.train.adapter import init_adapter, save_adapter
from finetune.train.sft import check_environment, lora_config, sft_config

log = logging.getLogger("finetune.train.trainer")


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    eval_loss: float | None
    first_loss: float | None
    last_loss: float | None
    seconds: float
    resumed_from: Path | None = None
    label_tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    # tokens the training forwards computed (trl's count; shared-prefix packing makes it less than the data's)
    tokens_computed: int | None = None
    rank_checksums: list[str] = field(default_factory=list)  # SHA-256 of the adapter on each process


class TrainingStopped(FinetuneError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; says how to resume."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, run_dir: Path):
        self.signal_name, self.step, self.checkpoint, self.run_dir = signal_name, step, checkpoint, run_dir
        super().__init__(
            f"training stopped by {signal_name} at step {step}; checkpoint saved: {checkpoint}. To resume, run the "
            f"same command with hydra.run.dir={run_dir} (train.resume=auto continues from the last checkpoint)")


@lru_cache(maxsize=1)
def trainer_class():
    """SFTTrainer + atomic checkpoints + label tokens/s in each training log record (built lazily: importing
    trl costs seconds, and `finetune train --help` should not pay them)."""
    import torch
    from trl import SFTTrainer

    from finetune.train.checkpoint import save_atomically
    from finetune.train.loss_head import use_compact_head

    class FinetuneTrainer(SFTTrainer):
        def __init__(self, *args, checkpoint_meta: dict, loraplus_lr_ratio: float | None = None, **kwargs):
            self.loraplus_lr_ratio = loraplus_lr_ratio  # read by create_optimizer, which train() calls later
            super().__init__(*args, **kwargs)
            use_compact_head(self)  # CPU: label positions only (finetune.train.loss_head)
            self.checkpoint_meta = checkpoint_meta  # what a resume must agree with (finetune.train.checkpoint)
            self._label_tokens = None  # label tokens since the last log, a device tensor (no sync per step)
            self._label_tokens_total = 0
            self._last_log_t: float | None = None
            self.label_tokens_per_s: list[float] = []

        def create_optimizer(self, model=None):
            ratio = self.loraplus_lr_ratio
            if ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            # LoRA+ through peft: B matrices at lr x ratio. The optimizer class and its kwargs are the ones
            # train.optim would get, so adamw_8bit and the rest keep working.
            from peft.optimizers import create_loraplus_optimizer

            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
            self.optimizer = create_loraplus_optimizer(
                opt_model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=ratio,
                loraplus_weight_decay=self.args.weight_decay, **kwargs)
            return self.optimizer

        def train(self, *args, **kwargs):
            # peft casts each LoRA input to the fp32 adapter dtype unless `torch.is_autocast_enabled()`, which
            # without a device argument asks about CUDA only; under accelerate's CPU bf16 autocast the fp32
            # copy is then cast straight back to bf16 for the LoRA matmul, and backward undoes both casts: four
            # full-size copies per adapted layer and step that change no value (a bf16 -> fp32 -> bf16 round
            # trip is exact). Profiled on the demo step (SmolLM2-135M nf4, 2,048 tokens, AMX Xeon, 2 cores):
            # 474 of 4,439 copies, the [2016 x 576] and [2016 x 1536] ones. peft's own switch turns the cast off
            # while accelerate autocasts the forward (on CUDA peft sees autocast and casts nothing anyway);
            # evaluation and merging afterwards run as before.
            from peft.helpers import disable_input_dtype_casting

            from finetune.train.lora_forward import lean_lora_forward

            # Plain LoRA layers without peft's full-size copy, scaling and addition (finetune.train.lora_forward),
            # on CPU, where it was measured.
            with disable_input_dtype_casting(self.model, active=self.accelerator.native_amp), \
                    lean_lora_forward(self.model, active=self.args.device.type == "cpu"):
                return super().train(*args, **kwargs)

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


def use_packed_attention(model, cfg: FinetuneConfig) -> bool:
    """Train packed rows with per-document attention (finetune.models.attention) when the model computes with
    sdpa: it is sdpa for anything that is not a packed row, and on a packed row it skips the cross-document
    scores. Measured on SmolLM2-135M nf4 QLoRA, bf16, 2 cores (one forward+backward, rows of 200-token
    documents): 2,048-token row 12.0 -> 6.9 s (1.74x), 4,096 43.5 -> 17.3 s (2.52x), 512 the same (2.03 vs
    2.06 s); losses equal to 4 decimals. model.attn_implementation=sdpa_packed asks for it everywhere,
    train.per_document_attention=false keeps plain sdpa."""
    from finetune.models import attention

    if not (cfg.train.packing and cfg.train.per_document_attention):
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", attention.NAME):
        return False  # eager asked for on purpose, flash_attention_2 (varlen already), flex
    attention.register()
    model.set_attn_implementation(attention.NAME)
    log.info("attention: %s (sdpa per document of each packed row)", attention.NAME)
    return True


def build_trainer(cfg: FinetuneConfig, splits, tokenizer, run_dir: Path, device: str, *, model=None):
    """Base model (quantized, k-bit prepared) + LoRA + SFTTrainer, ready to train. `model`: a base the caller
    already loaded with `load_base_model(cfg.model, cfg.quant, device)` (benchmarks/memory.py measures the
    loading apart), else it is loaded here."""
    import torch
    from transformers import set_seed

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from finetune.train.callbacks import ConsoleProgress, MetricsCallback
    from finetune.train.checkpoint import checkpoint_meta
    from finetune.train.guards import NonFiniteGuard

    set_seed(cfg.train.seed)  # LoRA init (and pissa_niter's randomized SVD) happen before the Trainer seeds
    if device == "cpu":  # one torch thread per physical core; two jobs on 2 cores each ran 8-19x slower
        from finetune.train.threads import configure_threads, warn_if_busy

        configure_threads(cfg.train.dataloader_num_workers)
        warn_if_busy()
    if model is None:
        model = load_base_model(cfg.model, cfg.quant, device)
    packed_attention = use_packed_attention(model, cfg)
    check_target_modules(model, cfg.peft, cfg.model.name_or_path)
    # A quantized base arrives frozen, its norms in the compute dtype or fp32 (quant.fp32_norms; see
    # finetune.models.load.prepare_quantized_base); checkpointing is
    # left to the Trainer (activation_checkpointing) so it is configured in one place.
    has_eval = splits.val is not None and len(splits.val) > 0
    trainer = trainer_class()(
        model=model,
        args=sft_config(cfg, run_dir, device, has_eval),
        train_dataset=splits.train,
        eval_dataset=splits.val if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.peft),
        callbacks=[NonFiniteGuard(), MetricsCallback(run_dir / "metrics.jsonl"), ConsoleProgress(),
                   *_tensorboard(cfg, run_dir)],
        checkpoint_meta=checkpoint_meta(cfg),
        loraplus_lr_ratio=cfg.train.loraplus_lr_ratio,
    )
    for default in (ProgressCallback, PrinterCallback):  # they print each log record as a raw dict
        trainer.remove_callback(default)
    if packed_attention and cfg.train.share_prefixes and getattr(trainer.data_collator, "padding_free", False):
        from finetune.train.shared_prefix import SharedPrefixCollator

        trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
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
    from finetune.train.guards import already_trained, restore_finished

    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    check_environment(cfg, device)
    trainer = build_trainer(cfg, splits, tokenizer, run_dir, device)
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    started = time.perf_counter()
    if already_trained(resume_from, cfg.train.max_steps):  # Trainer.train would run one step past max_steps
        restore_finished(trainer, resume_from)
    else:
        with stopper:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if stopper.received:
        found = complete_checkpoints(run_dir / "checkpoints")
        raise TrainingStopped(stopper.received, trainer.state.global_step, found[-1] if found else None, run_dir)

    eval_loss = _final_eval_loss(trainer, scored_later=_eval_scores_the_same_rows(cfg))
    _close_tensorboard(trainer)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    rates = trainer.label_tokens_per_s
    result = TrainResult(
        adapter_dir=run_dir / "adapter",
        steps=trainer.state.global_step,
        eval_loss=eval_loss,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        seconds=seconds,
        resumed_from=resume_from,
        label_tokens_per_s=round(sum(rates) / len(rates), 1) if rates else None,
        peak_memory_mb=round(peak_memory_mb(), 1),
        tokens_computed=int(getattr(trainer, "_total_train_tokens", 0)) or None,
    )
    result.rank_checksums = check_ranks_agree(trainer)
    save_adapter(trainer, cfg, run_dir, {"steps": result.steps,
                                         "resumed_from": str(resume_from) if resume_from else None})
    log.info("trained %d steps in %.1fs; loss %s -> %s; peak memory %.0f MB", result.steps, seconds,
             result.first_loss, result.last_loss, result.peak_memory_mb)
    del trainer
    return result


def _eval_scores_the_same_rows(cfg: FinetuneConfig) -> bool:
    """Whether the eval stage after training measures the loss on every validation row (its target_loss, on
    the merged model, in the prefill that starts generation)."""
    return bool(cfg.merge.enabled and cfg.eval.enabled and cfg.eval.loss and not cfg.eval.max_samples)


def _final_eval_loss(trainer, *, scored_later: bool = False) -> float | None:
    """eval_loss at the last step: the periodic eval's when it ran there, else one more evaluate().

    With `scored_later` the eval stage computes that loss on the same rows anyway, so the trainer's own pass
    is skipped (None): on the demo it took 8 s on an AMX Xeon and 71 s on a 2-core AVX2 EPYC (70 rows, 11,272
    tokens; 2026-12-03). One validation batch still goes through the final weights, since only a forward shows
    weights that are finite but overflow (NonFiniteGuard.on_evaluate): the adapter is not saved then.
    """
    if trainer.eval_dataset is None:
        return None
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        return evals[-1]["eval_loss"]
    if not scored_later:
        return trainer.evaluate()["eval_loss"]
    import torch

    from finetune.train.guards import NonFiniteTraining, advice

    batch = next(iter(trainer.get_eval_dataloader()))
    loss, _, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
    if loss is not None and not torch.isfinite(loss).all():
        raise NonFiniteTraining(
            f"training diverged by step {trainer.state.global_step}: eval_loss={loss.item()} on the first "
            "validation batch; the adapter was not saved. " + advice(trainer.args))
    log.info("final eval loss left to the eval stage, which scores the same validation rows (target_loss); "
             "the first validation batch is finite (loss %s)", "n/a" if loss is None else f"{float(loss):.4f}")
    return None


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
