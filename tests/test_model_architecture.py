"""A model is described by its own files: a preset's numbers never carry over to another model (issue 18)."""
from __future__ import annotations

import dataclasses

import pytest

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.load import load_architecture
from finetune.train.memory_plan import count_parameters

TINY_NUMBERS = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048, "tie_word_embeddings": True}


def _save(tmp_path, arch: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                             max_position_embeddings=4096)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(vocab_size=1200, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             max_position_embeddings=2048)
        model = Qwen2ForCausalLM(config)
    out = tmp_path / arch
    model.save_pretrained(out)
    return out, config, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_local_model_is_planned_from_its_own_config_not_the_preset(tmp_path, arch):
    folder, config, n_params = _save(tmp_path, arch)
    # the tiny preset's numbers stay in the config when only name_or_path is overridden
    cfg = ModelConfig(name_or_path=str(folder), architecture=dict(TINY_NUMBERS), architecture_of="embedded:tiny")
    numbers = load_architecture(cfg)
    assert numbers["hidden_size"] == config.hidden_size and numbers["num_hidden_layers"] == config.num_hidden_layers
    assert numbers["max_position_embeddings"] == config.max_position_embeddings
    # hand arithmetic from the saved config: q/k/v/o + gate/up/down + two norms per layer (+ q/k/v bias on
    # Qwen2), embeddings (twice when untied), the final norm; it must equal the saved model's parameter count
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + (q + 2 * kv if arch == "qwen2" else 0)
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    assert per_layer * L + embeddings + h == n_params
    assert count_parameters(numbers)["total"] == n_params
    assert count_parameters(TINY_NUMBERS)["total"] != n_params  # the preset's numbers would plan another model


def test_user_set_numbers_win_and_preset_numbers_serve_offline():
    mine = ModelConfig(name_or_path="nobody/not-a-model", architecture=dict(TINY_NUMBERS))
    assert load_architecture(mine)["hidden_size"] == 128  # set by the user: used as given, nothing read
    preset = dataclasses.replace(mine, architecture_of="nobody/not-a-model")
    assert load_architecture(preset)["hidden_size"] == 128  # config.json unreadable: the preset describes it
    other = dataclasses.replace(mine, architecture_of="embedded:tiny")
    with pytest.raises(FinetuneError, match="model.architecture has no numbers for this model"):
        load_architecture(other)
