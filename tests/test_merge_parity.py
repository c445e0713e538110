"""merged/parity.json: the merged model against the adapter model as trained (issue item 2)."""
import json
import logging

import pytest

from tests.support import run_cli
from finetune.cli import setup
from finetune.merge.stream import base_checkpoint_dir, merge_adapter, parity_report
from tests.test_merge_weights import compose_config, make_run


def run_cfg(run, *overrides):
    """The typed config `finetune merge run=<run> <overrides>` works with."""
    return setup(compose_config(f"run={run}", *overrides), from_run=True)


def test_fp32_merge_of_an_adapter_on_an_fp32_base_gives_identical_greedy_output(tmp_path):
    run = make_run(tmp_path / "run", "quant=none")
    out = merge_adapter(run_cfg(run, "merge.parity_max_new_tokens=24"), run)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["prompts"] == 8 and parity["prompt_source"] == "val split"
    assert parity["identical_greedy_outputs"] == 8
    assert parity["greedy_token_agreement"] == 1.0 and parity["ok"] and parity["warning"] is None
    assert parity["positions"] >= 8  # every prompt scored at least the first generated position
    assert parity["max_abs_logit_diff"] < 1e-4 * parity["max_abs_logit"]  # fp32 rounding, not another model
    assert parity["reference"] == "adapter on the none base as trained"


def test_nf4_roundtrip_base_reproduces_the_qlora_adapter_closer_than_the_original(tmp_path):
    """Why merge.base=auto picks the round trip after 4-bit training."""
    run = make_run(tmp_path / "run")  # the demo's quant: nf4
    original = json.loads((merge_adapter(run_cfg(run, "merge.base=original"), run) / "parity.json").read_text())
    roundtrip = json.loads((merge_adapter(run_cfg(run, "merge.base=nf4_roundtrip"), run,
                                          output=tmp_path / "rt") / "parity.json").read_text())
    assert roundtrip["merge"]["base"] == "nf4_roundtrip" and original["merge"]["base"] == "original"
    # The adapter was trained against dequantized nf4 weights; the original weights differ from them by
    # the 4-bit quantization error. Measured here (3 seeds): original 0.49-0.98 max |logit diff|, 90-98%
    # agreement; roundtrip 0.024-0.025, 99.6-100%. The roundtrip's residue is not the merge: bitsandbytes'
    # CPU 4-bit matmul computes in bf16 whatever the compute dtype (0.4% relative error per layer).
    assert original["max_abs_logit_diff"] > 5 * roundtrip["max_abs_logit_diff"]
    assert roundtrip["greedy_token_agreement"] >= max(0.99, original["greedy_token_agreement"])


def test_nf4_roundtrip_merges_into_exactly_the_dequantized_weights(tmp_path):
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    from finetune.models.load import load_base_model

    run = make_run(tmp_path / "run", target_modules=["q_proj"])
    cfg = run_cfg(run, "merge.base=nf4_roundtrip", "merge.parity_prompts=0")
    rt = load_file(str(merge_adapter(cfg, run) / "model.safetensors"))
    original = load_file(str(merge_adapter(run_cfg(run, "merge.base=original", "merge.parity_prompts=0"), run,
                                           output=tmp_path / "o")
                             / "model.safetensors"))
    quantized = load_base_model(cfg.model, cfg.quant, "cpu", quantize=True)  # as training loaded it
    layer = quantized.model.layers[1].mlp.down_proj  # not adapted: the weight is the base's
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(rt[key], dequantized) and not torch.equal(original[key], dequantized)
    q = "model.layers.1.self_attn.q_proj.weight"  # adapted: same LoRA delta on top of either base
    q_layer = quantized.model.layers[1].self_attn.q_proj.weight
    delta_rt = rt[q] - bnb.functional.dequantize_4bit(q_layer.data, q_layer.quant_state)
    base = load_file(str(base_checkpoint_dir(cfg.model) / "model.safetensors"))
    assert torch.allclose(delta_rt, original[q] - base[q], atol=1e-6)
    assert rt["model.norm.weight"].equal(original["model.norm.weight"])  # not 4-bit in training: untouched


def test_low_agreement_warns_loudly_and_in_the_report(tmp_path, caplog):
    run = make_run(tmp_path / "run", "quant=none")
    other = make_run(tmp_path / "other", "quant=none", seed=1)  # a different adapter, merged
    merged_other = merge_adapter(run_cfg(other, "merge.parity_prompts=0"), other)
    cfg = run_cfg(run, "merge.parity_threshold=0.999")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    with caplog.at_level(logging.WARNING, logger="finetune.merge.stream"):
        report = parity_report(cfg, run / "adapter", merged_other, tokenizer, "cpu")
    assert report["greedy_token_agreement"] < 0.999 and not report["ok"]
    assert "merge.parity_threshold=0.999" in report["warning"]
    assert any("PARITY WARNING" in r.getMessage() for r in caplog.records)


def test_parity_can_use_a_prompts_file_and_is_skipped_with_zero_prompts(tmp_path):
    run = make_run(tmp_path / "run", "quant=none")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"messages": [{"role": "user", "content": "Name a colour."}]}\n')
    out = merge_adapter(run_cfg(run, f"merge.prompts={prompts}", "merge.parity_max_new_tokens=4"), run)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["prompts"] == 2 and parity["prompt_source"] == str(prompts)
    skipped = merge_adapter(run_cfg(run, "merge.parity_prompts=0"), run, output=tmp_path / "m0")
    assert "skipped" in json.loads((skipped / "parity.json").read_text())["parity"]


@pytest.mark.slow
def test_a_trained_fp32_adapter_merges_to_identical_greedy_output(tmp_path):
    """The same contract on an adapter that really trained (quant=none): `finetune train` merges it itself."""
    res = run_cli("train", "quant=none", "train.max_steps=4", "train.save_steps=4", "eval.enabled=false",
                  f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    parity = json.loads((tmp_path / "merged" / "parity.json").read_text())
    assert parity["identical_greedy_outputs"] == parity["prompts"] == 8
    assert parity["greedy_token_agreement"] == 1.0
