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

import gc
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from finetune.errors import FinetuneError
from finetune.merge.model_card import read_json, write_model_card
from finetune.merge.parity import parity_report
from finetune.merge.shards import ST_DTYPES, ShardWriter, weight_files
from finetune.models.adapter import adapter_mismatch, check_adapter_dir
from finetune.models.load import load_base_model, model_path, resolve_device, resolve_dtype
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


class _AdapterOnMeta:
    """The base architecture on the meta device with the adapter attached; only adapter tensors are real."""

    def __init__(self, base_dir: Path, adapter_dir: Path, base_name: str):
        import torch
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights, set_peft_model_state_dict
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
        self.params = {n: [k for k, p in m._parameters.items() if p is not None]
                       for n, m in skeleton.named_modules() if any(p is not None for p in m._parameters.values())}
        names = {id(m): n for n, m in skeleton.named_modules()}
        inp, out = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
        self.tied = out is not None and out.weight is inp.weight
        self.embed, self.head = names[id(inp)], names.get(id(out))
        base_ids = {id(p) for p in skeleton.parameters()}
        try:
            self.model = PeftModel(skeleton, PeftConfig.from_pretrained(str(adapter_dir)))
        except (ValueError, KeyError) as e:
            raise adapter_mismatch(adapter_dir, base_name, e) from None
        # peft puts adapter tensors on the base layer's device, which is meta here, so they would never load:
        # give them real fp32 storage (merge arithmetic in fp32 whatever the output dtype) before loading.
        made = []
        for mod_name, mod in self.model.named_modules():
            for k, p in list(mod._parameters.items()):
                if p is not None and p.is_meta and id(p) not in base_ids:
                    mod._parameters[k] = torch.nn.Parameter(torch.empty(p.shape), requires_grad=False)
                    made.append(f"{mod_name}.{k}")
        state = load_peft_weights(str(adapter_dir), device="cpu")
        try:
            with warnings.catch_warnings():  # base tensors saved in the adapter land in self.overrides instead
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
                result = set_peft_model_state_dict(self.model, state)
        except RuntimeError as e:  # size mismatch
            raise adapter_mismatch(adapter_dir, base_name, e) from None
        if result.unexpected_keys:  # tensors for modules this architecture does not have
            raise adapter_mismatch(adapter_dir, base_name, ValueError(
                f"{len(result.unexpected_keys)} adapter tensors have no place in the base, e.g. "
                f"{result.unexpected_keys[0]}"))
        unloaded = sorted(set(made) & set(result.missing_keys))
        if unloaded:
            raise FinetuneError(f"{adapter_dir}: the adapter file lacks {len(unloaded)} tensors (e.g. {unloaded[0]}); "
                                "it was not saved completely")
        self.root = self.model.base_model.model
        # Tensors of the base model stored in the adapter file (bias="all", saved embedding layers) replace the base's.
        self.overrides = {}
        for key, t in state.items():
            base_key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            prefix = base_key.rpartition(".")[0]
            if "lora_" in key or prefix not in self.params or self._kind(prefix) == "saved":
                continue
            self.overrides[base_key] = t.float()

    def _kind(self, prefix: str) -> str:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
        from peft.utils.other import AuxiliaryTrainingWrapper

        mod = self.root.get_submodule(prefix)
        if isinstance(mod, ModulesToSaveWrapper):
            return "saved"
        if isinstance(mod, AuxiliaryTrainingWrapper):
            raise FinetuneError(f"{prefix}: {type(mod).__name__} (e.g. trainable_token_indices) cannot be merged "
                                "shard by shard; merge with peft's merge_and_unload() instead")
        return "lora" if isinstance(mod, BaseTunerLayer) else "plain"

    def finalize(self, prefix: str, tensors: dict) -> dict:
        """The merged tensors of one module, given its base tensors."""
        import torch

        tensors = {k: self.overrides.get(f"{prefix}.{k}", t) for k, t in tensors.items()}
        kind, mod = self._kind(prefix), self.root.get_submodule(prefix)
        if kind == "saved":  # modules_to_save: the trained copy replaces the base module
            return {k: p.detach() for k, p in mod.modules_to_save[mod.active_adapters[0]]._parameters.items()
                    if p is not None}
        if kind == "plain":
            return tensors
        base = mod.get_base_layer()
        for k, t in tensors.items():
            base._parameters[k] = torch.nn.Parameter(t.float(), requires_grad=False)
        try:
            mod.merge(safe_merge=True)  # peft's arithmetic; safe_merge raises on NaN/inf
        except ValueError as e:
            raise FinetuneError(f"merging the adapter into {prefix}: {e}") from None
        merged = {k: base._parameters[k].data for k in tensors}
        for k, t in tensors.items():  # drop the real tensor again: memory stays at one module
            base._parameters[k] = torch.nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False)
        mod.merged_adapters.clear()
        return merged


def _plan(adapter: "_AdapterOnMeta", files: list[Path], dtype) -> tuple[list, list, bool]:
    """(entries to read, output layout, untie) from the checkpoint headers; nothing is loaded yet."""
    import torch
    from safetensors import safe_open

    entries, layout = [], []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                src = getattr(torch, ST_DTYPES[sl.get_dtype()])
                entries.append((key, path))
                layout.append((key, sl.get_shape(), dtype if src.is_floating_point else src))
    keys = {k for k, _ in entries}
    head_key, embed_key = f"{adapter.head}.weight", f"{adapter.embed}.weight"
    changed = {adapter._kind(adapter.head), adapter._kind(adapter.embed)} != {"plain"} if adapter.tied else False
    # The adapter changes one side of a tied pair (or both, differently): store both, untie in config.json.
    untie = changed and embed_key in keys
    if untie and head_key not in keys:
        at = next(i for i, (k, _, _) in enumerate(layout) if k == embed_key) + 1
        layout.insert(at, (head_key, layout[at - 1][1], layout[at - 1][2]))
    return entries, layout, untie


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

    adapter = _AdapterOnMeta(base_dir, adapter_dir, base_name or str(base_dir))
    entries, layout, untie = _plan(adapter, weight_files(base_dir), dtype)
    keys = {k for k, _ in entries}
    missing = [p for p in adapter.params if adapter._kind(p) != "plain" and not (p == adapter.head and adapter.tied)
               and f"{p}.{adapter.params[p][0]}" not in keys]
    if missing:
        raise FinetuneError(f"{base_dir}: the adapter changes {missing[0]} but the checkpoint has no such tensor")
    writer = ShardWriter(out_dir, layout, max_shard_mb * 2**20)
    pending: dict[str, dict] = {}
    merged = 0
    try:
        for key, path in entries:
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
            merged += adapter._kind(prefix) != "plain"
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
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(m.dtype, device)
    base_dir = base_checkpoint_dir(cfg.model)
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
        write_model_card(tmp, run_dir, config=_as_dict(cfg))
        publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %s into %s (%s) -> %s", adapter_dir, cfg.model.name_or_path, m.base, output)
    return output


def _as_dict(cfg: FinetuneConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
