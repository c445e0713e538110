"""The streamed, shard-by-shard merge gives the same model as the adapter it merges, for every LoRA variant.

Also holds `make_run`, the fake run directory the other test_merge_* / test_generate_* files use: an
adapter with random (non-zero) LoRA weights on the embedded tiny model, saved the way training saves it.
Merging does not care whether the adapter was trained, and this takes a second instead of a minute.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.merge.stream import merge_weights

TOKENS = torch.tensor([[5, 17, 99, 230, 41, 7, 300, 12, 64, 400], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])


def compose_config(*overrides: str):
    """The composed config of `finetune train <overrides>` (DictConfig), without Hydra's own node."""
    from hydra import compose, initialize_config_dir

    from finetune.paths import CONFIG_DIR
    from finetune.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def make_adapter(base_model, out: Path, *, seed: int = 0, **lora) -> Path:
    """Attach a LoRA adapter with random A and B to `base_model` and save it to `out`; return `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    kw.update(lora)
    model = get_peft_model(base_model, LoraConfig(**kw))
    with torch.no_grad():  # init_lora_weights=False: A and B both random (nn.Linear's init), B is not zero
        for name, p in model.named_parameters():
            if "modules_to_save" in name or (kw.get("bias") == "all" and name.endswith("bias")):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def make_run(root: Path, *overrides: str, seed: int = 0, **lora) -> Path:
    """A run directory like `finetune train` leaves one (config.yaml, adapter/ with tokenizer), untrained adapter."""
    from omegaconf import OmegaConf

    from finetune.models.load import load_base_model, load_tokenizer
    from finetune.config import to_typed

    cfg = compose_config(*overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    typed = to_typed(cfg)
    base = load_base_model(typed.model, typed.quant, "cpu", quantize=True)
    adapter = make_adapter(base, root / "adapter", seed=seed, **lora)
    load_tokenizer(typed.model).save_pretrained(adapter)
    (adapter / "provenance.json").write_text(json.dumps({"base_model": typed.model.name_or_path,
                                                         "quant": typed.quant.method}))
    return root


def _merge_and_load(tiny_dir, adapter_dir, out, **kw):
    out.mkdir()
    info = merge_weights(Path(tiny_dir), adapter_dir, out, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(tiny_dir)
    config.tie_word_embeddings = not info["untied"]
    config.save_pretrained(out)
    return info, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


VARIANTS = {
    "lora_all_linear": {},
    "dora": {"use_dora": True},
    "rslora_with_trained_biases": {"use_rslora": True, "bias": "all"},
    "modules_to_save_lm_head": {"modules_to_save": ["lm_head"]},
    "lora_on_embed_and_lm_head": {"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
    "lora_on_embed_only": {"target_modules": ["embed_tokens", "down_proj"]},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_streamed_merge_reproduces_the_adapter_model(variant, tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    from peft import PeftModel

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        want = reference(input_ids=TOKENS).logits
        peft_merged = reference.merge_and_unload()(input_ids=TOKENS).logits  # peft's in-memory merge
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(input_ids=TOKENS).logits
    info, merged = _merge_and_load(tiny_dir, adapter, tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids=TOKENS).logits
    scale = want.abs().max()
    assert (want - plain).abs().max() > 0.1 * scale  # the adapter really changes the model
    assert (got - want).abs().max() <= 2e-5 * scale  # the unmerged adapter model, up to fp32 rounding
    if variant.startswith("lora_on_embed"):
        # peft's in-memory merge adds the embedding delta into the one shared (tied) matrix, so lm_head
        # changes too: the merged model is not the adapter model. The streamed merge unties instead.
        assert (peft_merged - want).abs().max() > 0.1 * scale
    else:
        assert (got - peft_merged).abs().max() <= 2e-6 * scale  # same arithmetic as peft's merge_and_unload
    assert info["merged_modules"] > 0


def test_tied_embeddings_stay_tied_when_the_adapter_leaves_them_alone(tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    info, merged = _merge_and_load(tiny_dir, make_adapter(base, tmp_path / "a"), tmp_path / "m")
    assert not info["untied"]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) >= {"model.embed_tokens.weight"} and "lm_head.weight" not in set(f.keys())
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("variant", ["modules_to_save_lm_head", "lora_on_embed_only"])
def test_tied_embeddings_are_untied_when_the_adapter_changes_one_side(variant, tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    orig_embed = base.model.embed_tokens.weight.detach().clone()
    adapter = make_adapter(base, tmp_path / "a", **VARIANTS[variant])
    info, merged = _merge_and_load(tiny_dir, adapter, tmp_path / "m")
    assert info["untied"]
    head, embed = merged.lm_head.weight, merged.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    if variant == "lora_on_embed_only":  # the output head keeps the base matrix, the input side changed
        assert torch.equal(head, orig_embed) and not torch.equal(embed, orig_embed)


def test_output_is_sharded_by_size_with_an_index(tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    info, _ = _merge_and_load(tiny_dir, make_adapter(base, tmp_path / "a"), tmp_path / "m", max_shard_mb=1)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(info["files"]) >= 2 and sorted(set(index["weight_map"].values())) == info["files"]
    for name in info["files"]:
        assert (tmp_path / "m" / name).stat().st_size <= 1 * 2**20 + 2**19  # one shard ~ max_shard_mb
    assert not list((tmp_path / "m").glob("part-*"))


def test_bfloat16_output_is_written_as_bfloat16(tiny_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    out = tmp_path / "m"
    out.mkdir()
    merge_weights(Path(tiny_dir), make_adapter(base, tmp_path / "a"), out, dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_adapter_for_another_base_is_refused_with_names_or_shapes(tiny_dir, tmp_path):
    from finetune.errors import FinetuneError

    other = AutoConfig.from_pretrained(tiny_dir)
    other.intermediate_size = 448  # same module names, other shapes
    adapter = make_adapter(AutoModelForCausalLM.from_config(other), tmp_path / "shapes")
    with pytest.raises(FinetuneError, match="does not fit base .*size mismatch for .*mlp"):
        merge_weights(Path(tiny_dir), adapter, tmp_path, dtype=torch.float32)

    deeper = AutoConfig.from_pretrained(tiny_dir)
    deeper.num_hidden_layers = 3  # same widths, one layer more: its tensors have no place in the base
    deeper.layer_types = deeper.layer_types + deeper.layer_types[-1:]
    adapter = make_adapter(AutoModelForCausalLM.from_config(deeper), tmp_path / "deeper")
    with pytest.raises(FinetuneError, match="does not fit base .*layers.2"):
        merge_weights(Path(tiny_dir), adapter, tmp_path, dtype=torch.float32)

    renamed = tmp_path / "names"
    shutil.copytree(adapter, renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value", "dense_4h_to_h"]  # a GPT-NeoX adapter's names
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FinetuneError, match="does not fit base .*query_key_value"):
        merge_weights(Path(tiny_dir), renamed, tmp_path, dtype=torch.float32)
