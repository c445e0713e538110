"""Merging the adapter into its base for fast generation, written as a self-contained model folder."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.model import load_base_model, resolve_device, resolve_dtype
from finetune.schema import FinetuneConfig

log = logging.getLogger("finetune.merge")


def check_adapter_dir(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise FinetuneError(f"{adapter_dir}: no adapter directory; train first (`finetune train`) or pass run=<run dir>")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise FinetuneError(f"{adapter_dir}: {name} is missing; the adapter was not saved completely")


def load_adapter_model(cfg: FinetuneConfig, adapter_dir: Path, device: str, *, quantize: bool):
    """Base (quantized as trained, or the original weights) with the adapter attached, unmerged."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    base = load_base_model(cfg.model, cfg.quant, device, quantize=quantize)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise FinetuneError(
            f"{adapter_dir}: the adapter does not fit base {cfg.model.name_or_path!r} "
            f"(names or shapes differ): {str(e).splitlines()[0]}"
        ) from None


def merge_adapter(cfg: FinetuneConfig, run_dir: Path, *, output: Path | None = None) -> Path:
    """Merge `run_dir/adapter` into the base and write `output` (default `run_dir/merged`).

    The base is reloaded unquantized (fp32 on CPU, bf16 on CUDA) so the merged weights are plain
    16/32-bit tensors any loader reads. Written under a temporary name, then renamed.
    """
    from transformers import AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.merge.dtype, device)
    output = Path(output or cfg.merge.output or run_dir / "merged")
    if output.exists() and not cfg.merge.overwrite:
        raise FinetuneError(f"{output} already exists; pass merge.overwrite=true to replace it")
    adapter_dir = run_dir / "adapter"
    model = load_adapter_model(cfg, adapter_dir, device, quantize=False)
    merged = model.merge_and_unload()
    merged.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # carries the chat template used in training

    from finetune.generate import stop_token_ids

    gen = merged.generation_config
    gen.eos_token_id = stop_token_ids(tokenizer, merged)  # includes <|im_end|>, so generation stops
    gen.pad_token_id = tokenizer.pad_token_id
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged adapter into %s -> %s", cfg.model.name_or_path, output)
    return output
