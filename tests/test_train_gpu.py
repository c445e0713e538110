"""GPU paths (marker `gpu`, excluded by default): bf16 QLoRA with gradient checkpointing and a paged 8-bit
optimizer on a Qwen2.5-0.5B-shaped random model, its measured peak against the memory plan; LoftQ init.

    .venv/bin/python -m pytest -q -m gpu tests/test_train_gpu.py -s      # prints the plan-vs-measured figures

conftest hides GPUs from the test process (CUDA_VISIBLE_DEVICES=""); the CLI runs here get GPU 0 back
(FINETUNE_TEST_GPU overrides). Nothing is downloaded: the model is built from its config with random weights.
"""
import json
import math
import os
import shutil

import pytest

from tests.support import run_cli

pytestmark = pytest.mark.gpu
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("FINETUNE_TEST_GPU", "0")}
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def random_qwen(tmp_path_factory, tiny_dir):
    """A Qwen2.5-0.5B-shaped model with random bf16 weights and the tiny model's tokenizer (ids < 2048)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen05b")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in tiny_dir.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


def _train(tmp_path, *overrides):
    res = run_cli("train", "device=cuda", "merge.enabled=false", "train.max_steps=3", "train.save_steps=3",
                  "train.report_to=[]", *overrides, f"hydra.run.dir={tmp_path}", env=GPU_ENV)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), (tmp_path / "train.log").read_text()


def test_qlora_bf16_checkpointing_paged_8bit_and_the_memory_plan(random_qwen, tmp_path):
    summary, log = _train(tmp_path, f"model.name_or_path={random_qwen}", "model.architecture=null",
                          "data.max_length=1024", "train.per_device_train_batch_size=2",
                          "train.optim=paged_adamw_8bit")
    planned_mb, measured_mb = summary["planned_memory_gib"] * 1024, summary["peak_memory_mb"]
    print(f"\nQwen2.5-0.5B shape, nf4, bf16, checkpointing, paged_adamw_8bit, 1024 x 2 tokens: "
          f"planned {planned_mb:.0f} MB, measured peak {measured_mb:.0f} MB "
          f"({measured_mb / planned_mb:.2f}x), {summary['label_tokens_per_s']} label tokens/s")
    assert "(nf4, torch.bfloat16) on cuda" in log  # compute dtype auto -> bf16 on CUDA
    assert "selected: ckpt" in log  # gradient checkpointing on by default for a quantized model on GPU
    # math.isfinite raises on None and is False for NaN/inf (x == x passed for None)
    assert summary["steps"] == 3 and math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    # The plan is for full micro-batches; packed demo rows fill them almost entirely.
    assert 0.5 * planned_mb < measured_mb < 1.3 * planned_mb


LOFTQ_CHECK = """
import sys, torch
from hydra import compose, initialize_config_dir
from finetune.paths import CONFIG_DIR
from finetune.pipeline import prepare_data
from finetune.config import register_configs, to_typed, validate
from finetune.train.trainer import build_trainer
import bitsandbytes as bnb
register_configs()
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = validate(to_typed(compose(config_name="config", overrides=[
        "device=cuda", "quant=nf4", "peft.init_lora_weights=loftq", "train.report_to=[]", "merge.enabled=false"])))
tok, splits = prepare_data(cfg, sys.argv[1])
trainer = build_trainer(cfg, splits, tok, __import__("pathlib").Path(sys.argv[1]), "cuda")
from safetensors.torch import load_file
from finetune.models.load import model_path
original = load_file(model_path(cfg.model) + "/model.safetensors")
layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
w = original["model.layers.0.self_attn.q_proj.weight"].cuda().float()
q = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float() * layer.scaling["default"]
print("ERR", (w - q).norm().item(), (w - q - ba).norm().item())
"""


def test_loftq_initialisation_shrinks_the_quantization_error(tmp_path):
    import subprocess
    import sys

    from tests.support import REPO

    res = subprocess.run([sys.executable, "-c", LOFTQ_CHECK, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, **GPU_ENV}, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    plain, loftq = map(float, next(x for x in res.stdout.splitlines() if x.startswith("ERR")).split()[1:])
    print(f"\nLoftQ on q_proj of layer 0: |W - Q| = {plain:.4g}, |W - Q - BA| = {loftq:.4g}")
    assert loftq < plain  # A and B start as the best rank-r fit of the quantization error
    summary, _ = _train(tmp_path / "run", "quant=nf4", "peft.init_lora_weights=loftq")
    assert summary["steps"] == 3
