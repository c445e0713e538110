"""Merging a LoRA adapter into its base, shard by shard, into a self-contained model folder.

Why not `PeftModel.merge_and_unload()` on a loaded model: that holds the whole base in memory (2 GB for
Qwen2.5-0.5B in fp32, 12 GB for the 3B) and then `save_pretrained` writes it. Here the base model is
built on the meta device (no memory), peft attaches the adapter to it, and the base checkpoint is read
one tensor at a time: each module's tensors are put into its peft layer, merged by peft's own
`merge()` (LoRA, rsLoRA, DoRA), and written to an output shard of at most `merge.max_shard_mb`.

merge.base=nf4_roundtrip merges into the weights the QLoRA adapter was trained against: the base is
loaded 4-bit exactly as in training (transformers + bitsandbytes) and each 4-bit layer is dequantized
only when its turn comes.

Tied embeddings (Qwen2.5): the checkpoint stores the embedding once. When the adapter changes only one
side (LoRA or modules_to_save on lm_head or embed_tokens), the merged folder stores both matrices and
its config says tie_word_embeddings=false; otherwise it stays tied.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from finetune.errors import FinetuneError
from finetune.merge.model_card import read_json, write_model_card
from finetune.merge.parity import parity_report
from finetune.merge.on_meta import AdapterOnMeta, plan_layout
from finetune.merge.shards import ShardWriter, weight_files
from finetune.models.adapter import check_adapter_dir
from finetune.models.load import load_base_model, model_path, resolve_device, resolve_dtype
from finetune.models.provenance import PROVENANCE, artifact_provenance, check_adapter_base, check_finite_weights
from finetune.config import FinetuneConfig, ModelConfig

log = logging.getLogger("finetune.merge.stream")


def base_checkpoint_dir(model_cfg: ModelConfig) -> Path:
    """Local folder with the base model's config.json and safetensors shards (Hub ids via the HF cache)."""
    path = model_path(model_cfg)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=model_cfg.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated: all end here
        raise FinetuneError(f"model.name_or_path={model_cfg.name_or_path!r}: base weights not found locally or "
                            f"on the Hub ({str(e).splitlines()[0]}); pass a local folder") from None


def _return_freed_memory() -> None:
    """Hand memory freed by the last module back to the OS (glibc only; elsewhere a no-op).

    Each module allocates and frees a few tensors of 9-35 MB (Qwen2.5-0.5B's MLP); glibc keeps such
    freed blocks in its heap, so without this the process grew by ~30 MB a module to 1 GB over the
    imports by the end of the 0.5B merge; with it, peak stays near the largest module (the embedding).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def merge_weights(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype, max_shard_mb: int = 1024,
                  dequantized: Optional[Callable[[str], Any]] = None, base_name: str = "") -> dict:
    """Stream `base_dir`'s safetensors through the adapter into shards in `out_dir` (weights only).

    Memory: one module's tensors at a time (the largest is the embedding), not a model copy.

    Args:
        dequantized: module name -> the weight training saw (dequantized 4-bit), or None to use the file's.
    Returns:
        {"merged_modules", "tensors", "untied", "files"}; "untied" means config.tie_word_embeddings must be false.
    """
    from safetensors import safe_open

    from finetune.distributed import progress

    adapter = AdapterOnMeta(base_dir, adapter_dir, base_name or str(base_dir))
    entries, layout, untie = plan_layout(adapter, weight_files(base_dir), dtype)
    keys = {k for k, _ in entries}
    missing = [p for p in adapter.params if adapter.kind(p) != "plain" and not (p == adapter.head and adapter.tied)
               and f"{p}.{adapter.params[p][0]}" not in keys]
    if missing:
        raise FinetuneError(f"{base_dir}: the adapter changes {missing[0]} but the checkpoint has no such tensor")
    writer = ShardWriter(out_dir, layout, max_shard_mb * 2**20)
    pending: dict[str, dict] = {}
    merged = 0
    try:
        for key, path in progress(entries, desc="merge", unit="tensor"):
            # One open per tensor: a safe_open handle keeps the pages it read mapped (resident) until it
            # closes, which held 600 MB of a 1 GB checkpoint here.
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(key)
            prefix, _, pname = key.rpartition(".")
            if pname not in adapter.params.get(prefix, ()):
                writer.add(key, tensor)  # not a parameter of the model class: keep as is
                continue
            pending.setdefault(prefix, {})[pname] = tensor
            if len(pending[prefix]) < len(adapter.params[prefix]):
                continue
            base = pending.pop(prefix)
            if dequantized is not None and (w := dequantized(prefix)) is not None:
                base["weight"] = w
            merged += adapter.kind(prefix) != "plain"
            for k, t in adapter.finalize(prefix, dict(base)).items():
                writer.add(f"{prefix}.{k}", t)
            if prefix == adapter.embed and untie and f"{adapter.head}.weight" not in keys:
                # The file stores the tied matrix once; the head gets its own copy (the adapter's, if any).
                head = adapter.finalize(adapter.head, {"weight": base["weight"]})["weight"]
                writer.add(f"{adapter.head}.weight", head)
            del base
            _return_freed_memory()
        files = writer.finish(out_dir)
    finally:
        writer.close()
    if pending:
        raise FinetuneError(f"{base_dir}: the checkpoint lacks tensors of {sorted(pending)[:3]} (incomplete download?)")
    return {"merged_modules": merged, "tensors": len(entries), "untied": untie, "files": files}


def nf4_dequantizer(cfg: FinetuneConfig, device: str) -> Callable[[str], Any]:
    """lookup(module name) -> the dequantized 4-bit weight training saw (fp32, CPU), or None if not 4-bit.

    The base is loaded exactly as in training (same transformers + bitsandbytes path, same quant group), so
    which layers are 4-bit and how they round is theirs, not a re-implementation. Only the 4-bit layers are
    kept (a quarter of their fp32 size); the rest of the model (the 272 MB bf16 embedding of Qwen2.5-0.5B)
    is dropped before the merge starts.
    """
    import bitsandbytes as bnb

    model = load_base_model(cfg.model, cfg.quant, device, quantize=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    del model
    gc.collect()
    _return_freed_memory()

    def lookup(name: str):
        m = layers.get(name)
        if m is None:
            return None
        return bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()

    return lookup


def _artifact_tokenizer(cfg: FinetuneConfig, adapter_dir: Path):
    """The tokenizer saved with the adapter (it carries the chat template used in training)."""
    from finetune.models.load import load_tokenizer

    has_own = (adapter_dir / "tokenizer_config.json").is_file()
    tok = load_tokenizer(cfg.model, str(adapter_dir) if has_own else None)
    if not has_own:
        log.warning("%s has no tokenizer; the merged model gets the base's (template: model.chat_template)",
                    adapter_dir)
    return tok


def _write_configs(base_dir: Path, out: Path, tokenizer, dtype, untied: bool) -> None:
    """config.json (dtype, tying) and generation_config.json whose eos ids include the end-of-turn token."""
    from transformers import AutoConfig, GenerationConfig

    from finetune.generate.generation import stop_token_ids

    config = AutoConfig.from_pretrained(base_dir)
    config.dtype = dtype
    if untied:
        config.tie_word_embeddings = False
    config.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = stop_token_ids(tokenizer, generation_config=gen)  # so plain generate() stops at a turn end
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)


def _merge_paths(cfg: FinetuneConfig, run_dir: Optional[Path], output: Optional[Path]) -> tuple[Path, Path]:
    """(adapter folder, output folder), checked before any weight is read: the output is free (or
    merge.overwrite), the adapter belongs to the run and was trained with this quant group."""
    m = cfg.merge
    if m.adapter:
        adapter_dir = Path(m.adapter)
    elif run_dir is not None:
        adapter_dir = Path(run_dir) / "adapter"
    else:
        raise FinetuneError("nothing to merge: add run=<run dir>, or merge.adapter=<adapter dir> with model=<its base>")
    output = Path(output or m.output or (Path(run_dir) if run_dir else adapter_dir.parent) / "merged")
    if output.exists() and not m.overwrite:
        raise FinetuneError(f"{output} already exists; pass merge.overwrite=true to replace it")
    check_adapter_dir(adapter_dir, run_dir)
    trained = read_json(adapter_dir / "provenance.json") or {}
    if trained.get("quant") and trained["quant"] != cfg.quant.method:  # the parity reference must be as trained
        raise FinetuneError(f"{adapter_dir}/provenance.json: the adapter was trained with quant={trained['quant']} "
                            f"but the config says quant={cfg.quant.method}; pass quant={trained['quant']}")
    return adapter_dir, output


def checkpoint_dtype(base_dir: Path):
    """The dtype a checkpoint's config.json declares (dtype / torch_dtype); float32 when it says nothing."""
    import torch

    try:
        config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name).removeprefix("torch."), torch.float32)


def merge_adapter(cfg: FinetuneConfig, run_dir: Optional[Path] = None, *, output: Optional[Path] = None) -> Path:
    """Merge an adapter into its base and write a self-contained model folder with merged/parity.json.

    Args:
        cfg: typed config; merge.base picks original or nf4_roundtrip weights, merge.adapter an explicit adapter.
        run_dir: the training run (adapter/, config, data stats, eval report); None with merge.adapter.
        output: overrides merge.output (default <run>/merged).
    Returns:
        The output folder. It appears only when complete (written under a temporary name, then renamed).
    Raises:
        FinetuneError: output exists without merge.overwrite, adapter missing or made for another base.
    """
    from finetune.files import publish_folder, write_json_atomic

    m = cfg.merge
    adapter_dir, output = _merge_paths(cfg, run_dir, output)
    check_adapter_base(adapter_dir, cfg.model)  # refuse a base the adapter was not trained on (provenance)
    device = resolve_device(cfg.device)
    base_dir = base_checkpoint_dir(cfg.model)
    # auto: the dtype the base checkpoint ships in (a 269 MB bf16 SmolLM2 stays 269 MB, not 538 MB of fp32);
    # peft merges in fp32 either way and each tensor is cast once, when written.
    dtype = checkpoint_dtype(base_dir) if m.dtype == "auto" else resolve_dtype(m.dtype, device)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        lookup = nf4_dequantizer(cfg, device) if m.base == "nf4_roundtrip" else None
        info = merge_weights(base_dir, adapter_dir, tmp, dtype=dtype, max_shard_mb=m.max_shard_mb,
                             dequantized=lookup, base_name=cfg.model.name_or_path)
        del lookup  # frees the 4-bit layers before the parity check loads models
        gc.collect()
        tokenizer = _artifact_tokenizer(cfg, adapter_dir)
        tokenizer.save_pretrained(tmp)
        _write_configs(base_dir, tmp, tokenizer, dtype, info["untied"])
        report = {"merge": {"base": m.base, "dtype": str(dtype).removeprefix("torch."), "adapter": str(adapter_dir),
                            "base_model": cfg.model.name_or_path, "revision": cfg.model.revision, **info}}
        report.update(parity_report(cfg, adapter_dir, tmp, tokenizer, device))
        write_json_atomic(tmp / "parity.json", report)
        write_model_card(tmp, run_dir, config=dataclasses.asdict(cfg))
        check_finite_weights(tmp, str(output))
        write_json_atomic(tmp / PROVENANCE, artifact_provenance(cfg.model, adapter_dir, kind="merged"))
        publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s into %s (%s) -> %s", adapter_dir, cfg.model.name_or_path, m.base, output)
    return output
