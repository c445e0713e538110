"""A PEFT adapter folder: completeness checks, and loading it (unmerged) onto its base.

Used by training's parity check, generation from a run, evaluation of checkpoints and merging.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.models.load import load_base_model

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_dir(adapter_dir: Path, run_dir: Optional[Path] = None) -> None:
    """Raise a FinetuneError naming what is missing when `adapter_dir` is not a complete PEFT adapter."""
    if not adapter_dir.is_dir():
        where = f"run={run_dir} has no adapter/ folder ({adapter_dir})" if run_dir else f"{adapter_dir}: no such folder"
        raise FinetuneError(f"{where}; train first (`finetune train`), or point merge.adapter= at an adapter folder")
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file() and not (name.endswith(".safetensors")
                                                        and (adapter_dir / "adapter_model.bin").is_file()):
            raise FinetuneError(f"{adapter_dir}: {name} is missing; the adapter was not saved completely "
                                "(train again, or use a checkpoint folder under checkpoints/)")
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise FinetuneError(f"{adapter_dir}/adapter_config.json: not valid JSON ({e}); the adapter is damaged") \
            from None


def adapter_mismatch(adapter_dir: Path, base: str, err: Exception) -> FinetuneError:
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or ["?"]
    why = next((line for line in lines if "size mismatch" in line), lines[0])  # torch lists them after a title
    return FinetuneError(
        f"{adapter_dir}: this adapter does not fit base {base!r} (module names or shapes differ; it was made for "
        f"{trained_on!r}): {why[:400]}. Merge it with the base it was trained on (model=... / model.name_or_path=...)")


def load_adapter_model(cfg: FinetuneConfig, adapter_dir: Path, device: str, *, quantize: bool):
    """Base (quantized as trained, or the original weights) with the adapter attached, unmerged."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    from finetune.models.provenance import check_adapter_base

    check_adapter_base(adapter_dir, cfg.model)  # trained on this base (provenance), before the weights load
    base = load_base_model(cfg.model, cfg.quant, device, quantize=quantize)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise adapter_mismatch(adapter_dir, cfg.model.name_or_path, e) from None
