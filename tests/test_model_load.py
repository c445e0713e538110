"""Loading a quantized base: checkpoint dtype, peft-equivalent k-bit preparation, 16-bit frozen embeddings."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from finetune.models.load import load_base_model, prepare_quantized_base, quantization_config
from finetune.config import to_typed

SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def bf16_checkpoint(request, tmp_path_factory):
    """A random Qwen2 saved in bf16, as Qwen2.5 checkpoints are."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16")
    Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=request.param)).to(torch.bfloat16).save_pretrained(path)
    return path


def _cfg(path, quant="nf4", compute_dtype="float32", **extra):
    """fp32 compute unless asked: peft's layout, whatever `auto` picks on this CPU."""
    return to_typed({"model": {"name_or_path": str(path)},
                     "quant": {"method": quant, "compute_dtype": compute_dtype, **extra}, "device": "cpu"})


def _peft_reference(path, cfg):
    """The same checkpoint loaded the same way, prepared by peft itself (embeddings widened to fp32)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu",
                                                 quantization_config=quantization_config(cfg.quant, torch.float32))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def test_quantized_base_keeps_the_frozen_embeddings_16bit_and_widens_the_rest(bf16_checkpoint):
    cfg = _cfg(bf16_checkpoint)
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.dtype == head.weight.dtype == torch.bfloat16
    assert (head.weight is emb.weight) == model.config.tie_word_embeddings
    layer = model.model.layers[0]
    assert layer.input_layernorm.weight.dtype == model.model.norm.weight.dtype == torch.float32
    assert layer.self_attn.q_proj.bias.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    # what it saves: the table in 2 bytes a value where peft keeps 4
    ref = _peft_reference(bf16_checkpoint, cfg)
    assert ref.get_input_embeddings().weight.dtype == torch.float32


def test_outputs_and_lora_gradients_equal_peft_preparation_bitwise(bf16_checkpoint):
    """The 16-bit table changes memory, not numbers: logits (plain forward), and the loss and LoRA gradients of
    trl's fused loss head (the training path) equal those of peft's fp32 table."""
    from trl.trainer.utils import add_fused_lm_head

    cfg = _cfg(bf16_checkpoint)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    ours, ref = load_base_model(cfg.model, cfg.quant, "cpu"), _peft_reference(bf16_checkpoint, cfg)
    with torch.no_grad():  # train mode: in eval mode bitsandbytes would repack the reference's 4-bit weights
        assert torch.equal(ours.train()(input_ids=ids).logits, ref.train()(input_ids=ids).logits)

    grads = []
    # fresh models: bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode forward
    for model in (load_base_model(cfg.model, cfg.quant, "cpu"), _peft_reference(bf16_checkpoint, cfg)):
        add_fused_lm_head(model)
        torch.manual_seed(2)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)).train()
        out = peft_model(input_ids=ids, labels=ids, fused_lm_head=True)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}))
    (loss_a, ga), (loss_b, gb) = grads
    assert torch.equal(loss_a, loss_b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_fsdp_keeps_peft_all_fp32_layout(bf16_checkpoint):
    cfg = _cfg(bf16_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype="auto", device_map="cpu",
                                                 quantization_config=quantization_config(cfg.quant, torch.float32))
    prepare_quantized_base(model, keep_embeddings_16bit=False)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_embeddings_of_an_fp32_checkpoint_stay_fp32(tiny_dir):
    """Narrowing an fp32 table would round it: only a table stored in 16 bits stays 16-bit."""
    cfg = _cfg(tiny_dir)
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_widened_head_survives_deepcopy(bf16_checkpoint):
    """peft's modules_to_save deep-copies the head: the copy must compute with its own weight."""
    cfg = _cfg(bf16_checkpoint)
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    head = model.get_output_embeddings()
    twin = copy.deepcopy(head)
    twin.weight.data = torch.zeros_like(twin.weight, dtype=torch.float32)
    x = torch.randn(3, SHAPE["hidden_size"])
    assert torch.equal(twin(x), torch.zeros(3, SHAPE["vocab_size"]))
    assert torch.equal(head(x), x @ head.weight.float().t())


def _cpu_repacks_4bit_weights() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return has_avx512bf16()


def test_4bit_layers_are_kept_in_the_training_layout(tiny_dir):
    """On any CPU: every Linear4bit the loader returns has bitsandbytes' CPU repacking turned off (the switch
    the test below exercises where the CPU has the instructions that trigger it)."""
    import bitsandbytes as bnb

    cfg = _cfg(tiny_dir)
    layers = [m for m in load_base_model(cfg.model, cfg.quant, "cpu").modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linear layers x 2 blocks
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


@pytest.mark.skipif(not _cpu_repacks_4bit_weights(),
                    reason="bitsandbytes repacks 4-bit weights for CPU inference only on CPUs with AVX512-BF16: "
                           "elsewhere nothing is repacked and this would pass whatever the loader does")
def test_training_continues_after_an_eval_forward(tiny_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode no-grad forward (AVX512-BF16 CPUs);
    the next training step then failed. The Trainer does exactly that with train.eval_steps."""
    import bitsandbytes as bnb

    cfg = _cfg(tiny_dir)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    # the hazard, on this CPU: the same checkpoint loaded without our preparation is repacked by that forward
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, device_map="cpu",
                                                 quantization_config=quantization_config(cfg.quant, torch.float32))
    with torch.no_grad():
        plain.eval()(input_ids=ids)
    assert all(m.weight.quant_state.packing_format_for_cpu
               for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit))

    model = get_peft_model(load_base_model(cfg.model, cfg.quant, "cpu"), LoraConfig(r=4, target_modules="all-linear"))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_compute_keeps_norms_biases_and_the_residual_stream_in_bf16(bf16_checkpoint):
    """quant.fp32_norms=false (default): with bf16 compute nothing between the layers is fp32, as in 16-bit LoRA
    (fp32 norms made every layer's output fp32, and autograd kept those activations: 6,941 against 5,572 MB at
    2,048 tokens on the 0.5B shape). The numbers stay those of peft's layout to bf16 precision, and a LoRA step
    gets fp32 gradients."""
    cfg = _cfg(bf16_checkpoint, compute_dtype="bfloat16")
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    layer = model.model.layers[0]
    assert layer.input_layernorm.weight.dtype == model.model.norm.weight.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.bias.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"} == {torch.bfloat16}
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = peft_model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    out.loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

    peft_layout = _cfg(bf16_checkpoint, compute_dtype="bfloat16", fp32_norms=True)
    ref = load_base_model(peft_layout.model, peft_layout.quant, "cpu")
    assert ref.model.layers[0].input_layernorm.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model.train()(input_ids=ids), ref.train()(input_ids=ids)
    assert {h.dtype for h in ref(input_ids=ids, output_hidden_states=True).hidden_states[1:]} == {torch.float32}
    assert torch.allclose(ours.logits.float(), theirs.logits.float(), atol=0.1, rtol=0.05)


def test_bf16_compute_on_an_fp32_checkpoint_runs_without_autocast(tiny_dir):
    """Norms of an fp32 checkpoint are narrowed to the bf16 stream; the fp32 table stays as stored, its rows and
    the head's product are cast to bf16, so a plain no-grad forward (generation, the parity check) works."""
    cfg = _cfg(tiny_dir, compute_dtype="bfloat16")
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
