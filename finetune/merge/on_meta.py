"""The base architecture on the meta device with the adapter attached: what the streamed merge (stream.py)
puts each module's base tensors into, and the output layout planned from the checkpoint headers."""
from __future__ import annotations

import warnings
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.merge.shards import ST_DTYPES
from finetune.models.adapter import adapter_mismatch


class AdapterOnMeta:
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
            if "lora_" in key or prefix not in self.params or self.kind(prefix) == "saved":
                continue
            self.overrides[base_key] = t.float()

    def kind(self, prefix: str) -> str:
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
        kind, mod = self.kind(prefix), self.root.get_submodule(prefix)
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


def plan_layout(adapter: "AdapterOnMeta", files: list[Path], dtype) -> tuple[list, list, bool]:
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
    changed = {adapter.kind(adapter.head), adapter.kind(adapter.embed)} != {"plain"} if adapter.tied else False
    # The adapter changes one side of a tied pair (or both, differently): store both, untie in config.json.
    untie = changed and embed_key in keys
    if untie and head_key not in keys:
        at = next(i for i, (k, _, _) in enumerate(layout) if k == embed_key) + 1
        layout.insert(at, (head_key, layout[at - 1][1], layout[at - 1][2]))
    return entries, layout, untie
