"""The lean LoRA forward used while training on CPU (finetune.train.lora_forward): peft's outputs and gradients on
a 4-bit and a 16-bit base, peft's own forward for anything but plain LoRA, and peft's forward back afterwards."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from finetune.config import register_configs, to_typed
from finetune.models.load import load_base_model
from finetune.paths import CONFIG_DIR
from finetune.train import lora_forward

register_configs()


def _peft_model(quant: str, **lora):
    from peft import LoraConfig, get_peft_model

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_typed(compose(config_name="config", overrides=["device=cpu", f"quant={quant}"]))
    torch.manual_seed(0)
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    settings = dict(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian") | lora
    return get_peft_model(model, LoraConfig(**settings))


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_same_loss_and_gradients_as_peft(quant):
    model = _peft_model(quant)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want, want_grads = _loss_and_grads(model, ids)
    with lora_forward.lean_lora_forward(model) as layers:
        assert layers == len(lora_forward.lora_layers(model)) > 0
        got, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    layer = lora_forward.lora_layers(model)[0]
    assert "forward" not in vars(layer) and not hasattr(layer, lora_forward._ORIGINAL)  # peft's forward again


@pytest.mark.parametrize("lora", [
    {"use_dora": True}, {"lora_dropout": 0.1}, {"lora_bias": True, "init_lora_weights": True}])
def test_anything_but_plain_lora_runs_pefts_forward(lora):
    model = _peft_model("none", **lora)
    layer = lora_forward.lora_layers(model)[0]
    x = torch.randn(3, layer.in_features)
    assert lora_forward._plain_adapter(layer, x) is None
    plain = lora_forward.lora_layers(_peft_model("none"))[0]
    assert lora_forward._plain_adapter(plain, x) == "default"
    with lora_forward.lean_lora_forward(plain):
        plain.merge()
        assert lora_forward._plain_adapter(plain, x) is None  # merged: the base layer holds the sum
        plain.unmerge()


def test_training_on_cpu_runs_the_lean_forward_and_restores_peft(tmp_path):
    from transformers import TrainerCallback

    from finetune.pipeline import prepare_data
    from finetune.train.trainer import build_trainer

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = to_typed(compose(config_name="config", overrides=[
            "device=cpu", "train.max_steps=2", "train.save_steps=100", "train.report_to=[]"]))
    tokenizer, splits = prepare_data(cfg, tmp_path / "data")
    trainer = build_trainer(cfg, splits, tokenizer, tmp_path / "run", "cpu")
    layer = lora_forward.lora_layers(trainer.model)[0]
    seen = []

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(getattr(layer.forward, "__func__", None) is lora_forward._forward)

    trainer.add_callback(Look())
    trainer.train()
    assert seen == [True, True]
    assert "forward" not in vars(layer)
