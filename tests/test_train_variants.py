"""Quantization methods and LoRA variants on the tiny model (CPU): what loads, what trains, what is saved."""
import json

import bitsandbytes as bnb
import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import PeftModel
from safetensors.torch import load_file

from finetune.models.load import load_base_model
from finetune.paths import CONFIG_DIR
from finetune.pipeline import prepare_data
from finetune.config import register_configs, to_typed
from finetune.train.trainer import build_trainer, save_adapter

register_configs()


def typed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=[
            "device=cpu", "train.max_steps=2", "train.save_steps=100", "train.report_to=[]", *overrides]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tokenizer, splits = prepare_data(typed(), tmp_path_factory.mktemp("data"))
    return splits, tokenizer


@pytest.mark.parametrize("method,layer,quant_type", [
    ("nf4", bnb.nn.Linear4bit, "nf4"), ("fp4", bnb.nn.Linear4bit, "fp4"),
    ("int8", bnb.nn.Linear8bitLt, None), ("none", torch.nn.Linear, None)])
def test_quant_methods_load_as_configured(method, layer, quant_type):
    cfg = typed(f"quant={method}")
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is layer
    if quant_type:
        assert q.weight.quant_type == quant_type
        assert q.weight.quant_state.nested  # double quantization: the absmax constants are quantized too
        assert q.weight.quant_state.dtype == torch.float32  # compute dtype auto = fp32 on CPU
    elif method == "none":
        assert q.weight.dtype == torch.float32


def test_kbit_preparation_leaves_only_fp32_lora_weights_trainable(data, tmp_path):
    trainer = build_trainer(typed(), *data, tmp_path, "cpu")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    embed = trainer.model.get_base_model().model.embed_tokens.weight
    assert embed.dtype == torch.float32 and not embed.requires_grad
    assert not trainer.model.get_base_model().is_gradient_checkpointing  # off on CPU by default


def _train(cfg, data, run_dir):
    trainer = build_trainer(cfg, *data, run_dir, "cpu")
    trainer.train()
    save_adapter(trainer, cfg, run_dir, {})
    return trainer


def test_dora_trains_on_a_4bit_base(data, tmp_path):
    trainer = _train(typed("peft=dora"), data, tmp_path)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved)
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["use_dora"] is True


def test_modules_to_save_trains_the_embeddings_in_full_and_keeps_them_tied(data, tmp_path):
    trainer = _train(typed("peft.modules_to_save=[embed_tokens]"), data, tmp_path)
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    embed = [k for k in saved if "embed_tokens" in k]
    assert embed and saved[embed[0]].shape[0] > 100  # the full (vocab x hidden) matrix, not a LoRA factor
    model = trainer.model
    # the tiny model ties lm_head to embed_tokens, like Qwen2.5: the trained copy must drive both
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    original = load_base_model(typed().model, typed("quant=none").quant, "cpu").get_input_embeddings().weight
    assert not torch.equal(model.get_input_embeddings().weight.float(), original)  # it did train


def test_pissa_adapter_is_saved_as_a_plain_lora_of_the_original_base(data, tmp_path):
    cfg = typed("quant=none", "peft.init_lora_weights=pissa", "peft.lora_dropout=0")
    trainer = _train(cfg, data, tmp_path)
    adapter_cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 * cfg.peft.r and adapter_cfg["init_lora_weights"] is True
    ids = torch.tensor([[5, 17, 99, 250, 3, 42, 7, 300]])
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        # PiSSA rewrote the base weights in place; the converted adapter must work on the untouched original.
        original = load_base_model(cfg.model, cfg.quant, "cpu")
        reloaded = PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    assert torch.allclose(trained, reloaded, atol=1e-4), (trained - reloaded).abs().max()


def test_loraplus_trains_b_matrices_at_ratio_times_the_learning_rate(data, tmp_path):
    cfg = typed("train.loraplus_lr_ratio=16", "train.learning_rate=1e-3")
    trainer = build_trainer(cfg, *data, tmp_path, "cpu")
    optimizer = trainer.create_optimizer()
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {by_id[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs and set(lrs) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {lr for n, lr in lrs.items() if "lora_A" in n} == {1e-3}
    assert [lr for n, lr in lrs.items() if "lora_B" in n] == pytest.approx([1.6e-2] * (len(lrs) // 2))
    trainer.train()
    assert trainer.state.global_step == 2
    # the scheduler the training ran decays each group from its own rate
    groups, bases = trainer.optimizer.param_groups, trainer.lr_scheduler.base_lrs
    rate = {("B" if "lora_B" in by_id[id(g["params"][0])] else "A"): base
            for g, base in zip(groups, bases) if g["params"]}
    assert rate == {"A": 1e-3, "B": pytest.approx(1.6e-2)}


def test_without_loraplus_every_lora_matrix_shares_one_learning_rate(data, tmp_path):
    trainer = build_trainer(typed("train.learning_rate=1e-3"), *data, tmp_path, "cpu")
    assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {1e-3}


def test_cpu_bf16_training_feeds_lora_its_input_in_bf16_and_restores_peft_casting(data, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    trainer = build_trainer(typed("quant.compute_dtype=bfloat16"), *data, tmp_path, "cpu")
    assert trainer.accelerator.native_amp  # accelerate autocasts the forward on CPU
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    seen = []
    hook = layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    trainer.train()
    hook.remove()
    # peft would have cast it to the fp32 adapter dtype (autocast then casting it back to bf16)
    assert seen and set(seen) == {torch.bfloat16}
    tuners = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    assert tuners and all(m.cast_input_dtype_enabled for m in tuners)  # peft's default again after training
