"""Memory plan: hand arithmetic for Qwen2.5-3B, and the formulas checked against real transformers/peft modules."""
from __future__ import annotations

import math

import pytest

from finetune.train.memory_plan import GIB, count_parameters, format_plan, lora_parameter_count, plan_memory

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1000, tie_word_embeddings=True, qkv_bias=True)
QLORA = dict(quant_method="nf4", double_quant=True, compute_dtype="bfloat16", r=16, target_modules="all-linear",
             optimizer="adamw_torch", seq_len=2048, micro_batch=1, gradient_checkpointing=True)


def test_qwen25_3b_by_hand():
    h, i, L, V, q, kv = 2048, 11008, 36, 151936, 16 * 128, 2 * 128
    attn = (h * q + q) + 2 * (h * kv + kv) + q * h  # q/k/v carry a bias, o_proj does not
    mlp = 3 * h * i
    total = V * h + L * (attn + mlp + 2 * h) + h  # tied lm_head adds nothing; final norm
    counts = count_parameters(QWEN25_3B)
    assert counts["total"] == total == 3_085_938_688  # the model card's "3.09 B"
    assert counts["lm_head"] == 0 and counts["embed"] == V * h == 311_164_928

    lora = L * 16 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    assert lora_parameter_count(QWEN25_3B, 16, "all-linear") == lora == 29_933_568  # "about 29.9 M"
    assert lora_parameter_count(QWEN25_3B, 16, ["q_proj", "v_proj"]) == L * 16 * ((h + q) + (h + kv))

    p = plan_memory(QWEN25_3B, **QLORA)
    linear_weights = L * (attn + mlp - q - 2 * kv)  # biases are not quantized
    blocks = sum(math.ceil(n / 64) for n in (h * q, h * kv, h * kv, q * h, h * i, h * i, i * h))
    dq = sum(math.ceil(n / 64) + 4 * math.ceil(math.ceil(n / 64) / 256) + 4
             for n in (h * q, h * kv, h * kv, q * h, h * i, h * i, i * h))
    fp32_rest = 4 * ((2 * L + 1) * h + L * (q + 2 * kv))  # norms and biases upcast to fp32
    embedding = 2 * V * h  # the frozen tied table stays bf16, as the checkpoint stores it
    assert p.weights == linear_weights // 2 + L * dq + fp32_rest + embedding
    assert 0.126 < 8 * L * dq / linear_weights < 0.128  # double quant: ~0.127 bit per weight
    assert L * blocks * 4 * 8 / linear_weights == 0.5  # plain absmax: 0.5 bit per weight
    assert p.lora_params == p.gradients == 4 * lora and p.optimizer == 8 * lora
    # trl's fused loss head: a bf16 logits tile of 2048 tokens x 32768 vocab, the bf16 table needs no cast, the
    # fp32 hidden states are cast to bf16 per tile, their fp32 gradient, 8 fp32 statistics per token
    assert p.detail["loss_peak"] == 2048 * 32768 * 2 + 2048 * h * 2 + 4 * 2048 * h + 4 * 8 * 2048
    fp32_table = plan_memory(QWEN25_3B, **QLORA, embedding_dtype="float32")  # FSDP: peft's fp32 layout
    assert fp32_table.weights - p.weights == 2 * V * h
    assert fp32_table.detail["loss_peak"] - p.detail["loss_peak"] == 32768 * h * 2  # table tile cast to bf16
    assert p.detail["ckpt_inputs"] == L * h * 4 * 2048  # one fp32 hidden state per layer per token
    assert p.total == p.weights + p.lora_params + p.gradients + p.optimizer + p.activations + p.overhead
    assert 3.5 * GIB < p.total < 4.5 * GIB
    table = format_plan(p)
    assert "no ckpt" in table and "total" in table and f"{p.total_ckpt / GIB:.2f}" in table


def test_checkpointing_and_quantization_order():
    p = plan_memory(QWEN25_3B, **QLORA)
    assert p.activations_ckpt < p.activations_no_ckpt / 3 and p.total_ckpt < p.total_no_ckpt
    assert p.activations == p.activations_ckpt
    no_ckpt = plan_memory(QWEN25_3B, **{**QLORA, "gradient_checkpointing": False})
    assert no_ckpt.activations == no_ckpt.activations_no_ckpt == p.activations_no_ckpt
    w = {m: plan_memory(QWEN25_3B, **{**QLORA, "quant_method": m}).weights for m in ("nf4", "int8", "none")}
    assert w["nf4"] < w["int8"] < w["none"]
    eight_bit = plan_memory(QWEN25_3B, **{**QLORA, "optimizer": "paged_adamw_8bit"})
    assert eight_bit.optimizer < p.optimizer / 3
    longer = plan_memory(QWEN25_3B, **{**QLORA, "seq_len": 8192})
    assert longer.activations > 3.5 * p.activations


@pytest.mark.parametrize("change, key", [
    ({"r": 0}, "peft.r"), ({"r": -4}, "peft.r"), ({"quant_method": "nf3"}, "quant.method"),
    ({"optimizer": "adam"}, "train.optim"), ({"target_modules": ["qproj"]}, "target_modules"),
    ({"seq_len": 0}, "seq_len"), ({"compute_dtype": "half"}, "compute_dtype"),
])
def test_bad_arguments_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        plan_memory(QWEN25_3B, **{**QLORA, **change})


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_or_bad_architecture_key(key):
    arch = {k: v for k, v in QWEN25_3B.items() if k != key}
    with pytest.raises(ValueError, match=key):
        count_parameters(arch)
    with pytest.raises(ValueError, match=key):
        plan_memory({**QWEN25_3B, key: 0}, **QLORA)
    with pytest.raises(ValueError, match="peft.r"):
        lora_parameter_count(QWEN25_3B, 0, "all-linear")


def test_plan_from_the_shipped_qwen_config():
    """configs/model/qwen2_5_3b_instruct.yaml carries the numbers; the plan follows the typed config's groups."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from finetune.train.memory_plan import plan_from_config
    from finetune.config import to_typed

    model = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/model/qwen2_5_3b_instruct.yaml")
    cfg = to_typed({"model": model, "data": {"max_length": 2048}, "train": {"per_device_train_batch_size": 4}})
    plan = plan_from_config(cfg)
    assert plan.base_params == 3_085_938_688 and plan.lora_param_count == 29_933_568
    assert plan.tokens_per_step == 4 * 2048 and plan.gradient_checkpointing  # quantized base: on by default
    assert plan.detail["attention_mask"] == (4 * 2048) ** 2  # padding-free: one flattened row of 8,192 tokens
    assert plan.inputs["compute_dtype"] == "bfloat16" and plan.inputs["optimizer"] == cfg.train.optim
    # norms in the compute dtype (quant.fp32_norms=false): a 16-bit residual stream; peft's layout keeps it fp32
    assert not plan.inputs["upcast_non_quantized"]
    cfg.quant.fp32_norms = True
    fp32_layout = plan_from_config(cfg)
    assert fp32_layout.inputs["upcast_non_quantized"]
    assert fp32_layout.detail["ckpt_inputs"] == 2 * plan.detail["ckpt_inputs"]
    cfg.model.architecture = None
    with pytest.raises(ValueError, match="model.architecture"):
        plan_from_config(cfg)


# ---- against real modules (tiny shapes, CPU) ----

def _tiny_model(arch: dict, model_type: str = "qwen2"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = {k: v for k, v in arch.items() if k != "qkv_bias"}
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw, attn_implementation="sdpa"))
    return LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa"))


@pytest.mark.parametrize("arch, model_type", [
    (TINY, "qwen2"),
    ({**TINY, "tie_word_embeddings": False, "num_key_value_heads": 4}, "qwen2"),
    ({**TINY, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True, "qkv_bias": None}, "llama"),
])
def test_counts_match_real_model_and_peft(arch, model_type):
    from peft import LoraConfig, get_peft_model

    model = _tiny_model(arch, model_type)
    real = {"embed": 0, "attn": 0, "mlp": 0, "norm": 0, "lm_head": 0}
    for name, p in model.named_parameters():  # tied lm_head is listed once, under embed_tokens
        kind = ("embed" if "embed_tokens" in name else "attn" if "self_attn" in name else "mlp" if "mlp" in name
                else "lm_head" if "lm_head" in name else "norm")
        real[kind] += p.numel()
    counts = count_parameters({**arch, "model_type": model_type})
    assert {k: counts[k] for k in real} == real
    for r, targets in ((8, "all-linear"), (4, ["q_proj", "v_proj", "down_proj"])):
        peft_model = get_peft_model(_tiny_model(arch, model_type), LoraConfig(r=r, target_modules=targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert lora_parameter_count(arch, r, targets) == trainable


def _saved_bytes_in_layer(model, layers, index, input_ids, position_ids, autocast: bool) -> int:
    """Bytes of storage autograd keeps for backward that only layer `index` created (parameters, autocast
    weight copies and the rotary cos/sin every layer shares are excluded: the plan counts them elsewhere)."""
    import torch

    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    where: dict[int, set] = {}
    size: dict[int, int] = {}
    state = {"layer": None}
    alive = []  # hold every saved tensor, so no freed storage hands its address to a later one

    def pack(t):
        alive.append(t)
        ptr = t.untyped_storage().data_ptr()
        # parameters are looked up at each save, not once: bitsandbytes' Linear4bit recasts its bias to the
        # compute dtype inside forward, which frees the old storage, and a later activation may get its address
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        if ptr not in params and tuple(t.shape) not in shapes:
            where.setdefault(ptr, set()).add(state["layer"])
            size[ptr] = t.untyped_storage().nbytes()
        return t

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: state.update(layer=i))
        layer.register_forward_hook(lambda *_: state.update(layer=None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids, use_cache=False)
    out.loss.backward()
    return sum(size[ptr] for ptr, places in where.items() if places == {index})


def _tiny_nf4(tmp_path):
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

    _tiny_model(TINY).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16,
                                             device_map="cpu")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# name: (base, plan arguments, attention, packed rows, lora_dropout)
CASES = {
    "fp32_unpacked": ("fp32", dict(quant_method="none", compute_dtype="float32"), "sdpa", False, 0.0),
    "fp32_packed": ("fp32", dict(quant_method="none", compute_dtype="float32"), "sdpa", True, 0.0),
    "fp32_dropout": ("fp32", dict(quant_method="none", compute_dtype="float32"), "sdpa", True, 0.1),
    "fp32_eager": ("fp32", dict(quant_method="none", compute_dtype="float32"), "eager", True, 0.0),
    "autocast_eager": ("autocast", dict(quant_method="none", compute_dtype="bfloat16", upcast_non_quantized=True),
                       "eager", True, 0.0),
    "nf4_packed": ("nf4", dict(quant_method="nf4", compute_dtype="bfloat16"), "sdpa", True, 0.0),
    "nf4_dropout": ("nf4", dict(quant_method="nf4", compute_dtype="bfloat16"), "sdpa", True, 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_activations_match_saved_tensors(case, tmp_path):
    """The per-layer activation rule equals the bytes autograd really keeps in a Qwen2 block with LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    base, kw, attn, packed, dropout = CASES[case]
    T, r = 24, 4  # T differs from every weight dimension, so weight copies are told apart by shape
    model = _tiny_nf4(tmp_path) if base == "nf4" else _tiny_model(TINY)
    model.set_attn_implementation(attn)
    model = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear", lora_dropout=dropout))
    ids = torch.randint(0, TINY["vocab_size"], (1, T))
    # two packed sequences: transformers builds a block-causal mask, as for trl's padding-free batches
    pos = torch.cat([torch.arange(T // 2), torch.arange(T // 2)])[None] if packed else None
    measured = _saved_bytes_in_layer(model, model.base_model.model.model.layers, 1, ids, pos, base != "fp32")

    plan = plan_memory(TINY, **kw, double_quant=True, r=r, target_modules="all-linear", optimizer="adamw_torch",
                       seq_len=T, micro_batch=1, gradient_checkpointing=False, lora_dropout=dropout,
                       attn_implementation=attn if packed else "flash_attention_2")  # unmasked = native GQA
    expected = plan.detail["layer_activations"]
    assert expected == T * sum(v for k, v in plan.detail.items() if k.startswith("per_token_layer"))
    if dropout:  # CPU dropout keeps an fp32 mask; CUDA's fused dropout the 1-byte bool the plan counts
        fan_in = 6 * TINY["hidden_size"] + TINY["intermediate_size"]  # q, k, v, o, gate, up + down
        expected += (4 - 1) * fan_in * T
    assert measured == expected


def test_checkpointing_keeps_one_hidden_state_per_layer():
    import torch
    from peft import LoraConfig, get_peft_model

    T = 24
    model = get_peft_model(_tiny_model(TINY), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    ids = torch.randint(0, TINY["vocab_size"], (1, T))
    measured = _saved_bytes_in_layer(model, model.base_model.model.model.layers, 1, ids, None, False)
    plan = plan_memory(TINY, quant_method="none", double_quant=False, compute_dtype="float32", r=4,
                       target_modules="all-linear", optimizer="adamw_torch", seq_len=T, micro_batch=1,
                       gradient_checkpointing=True, lora_dropout=0.0)
    assert measured * TINY["num_hidden_layers"] == plan.detail["ckpt_inputs"] == 2 * 64 * 4 * T
