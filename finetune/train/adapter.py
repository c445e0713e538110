"""The adapter's own start and end: PiSSA / LoftQ initialisation, and <run>/adapter written atomically with
its provenance (base model, LoRA shape, config hash)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.files import publish_folder, write_json_atomic
from finetune.models.load import model_path
from finetune.models.provenance import adapter_sha256, base_identity, check_finite_weights
from finetune.config import FinetuneConfig


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
            # training_args.bin is a pickle (torch.load needs weights_only=False to read it); the run's config.yaml
            # already holds every training value, so the shipped adapter carries none.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            check_finite_weights(tmp, f"{adapter_dir}")
            peft_cfg = trainer.model.peft_config["default"]
            write_json_atomic(tmp / "provenance.json", {
                "base": base_identity(cfg.model),
                "adapter_sha256": adapter_sha256(tmp),
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
            publish_folder(tmp, adapter_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return adapter_dir


def _config_hash(run_dir: Path) -> str | None:
    """SHA-256 of <run>/config.yaml; None when train() is called from Python without a saved config."""
    path = run_dir / "config.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
