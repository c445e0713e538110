"""The main job end to end on CPU, through the real command line: data -> nf4 QLoRA -> adapter -> merge -> eval."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = run_cli("train", "train.max_steps=6", "train.save_steps=3", "eval.max_samples=4",
                  "eval.max_new_tokens=24", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res


def test_run_directory_has_every_artifact(demo_run):
    out, res = demo_run
    for rel in ("config.yaml", "metrics.jsonl", "data/stats.json", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors", "adapter/provenance.json", "merged/config.json",
                "merged/generation_config.json", "eval/report.json", "eval/predictions.jsonl", "eval/report.md"):
        assert (out / rel).is_file(), rel
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_adapter_was_trained_on_a_4bit_base(demo_run):
    out, _ = demo_run
    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 16
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["quant"]["method"] == "nf4"
    saved = json.loads((out / "adapter/provenance.json").read_text())
    assert saved["quant"] == "nf4"


def test_merged_model_loads_with_plain_transformers_and_stops(demo_run):
    out, _ = demo_run
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "merged")
    gen = json.loads((out / "merged/generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_eval_report_is_machine_readable(demo_run):
    out, _ = demo_run
    report = json.loads((out / "eval/report.json").read_text())
    assert report["metrics"]["rows"] == 4
    assert 0.0 <= report["metrics"]["exact_match"] <= 1.0
    preds = [json.loads(line) for line in (out / "eval/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all("generated" in p and "target" in p for p in preds)


def test_merge_refuses_existing_output_then_overwrites(demo_run):
    out, _ = demo_run
    res = run_cli("merge", f"run={out}")
    assert res.returncode == 2 and "already exists" in res.stderr and "merge.overwrite=true" in res.stderr
    res = run_cli("merge", f"run={out}", "merge.overwrite=true")
    assert res.returncode == 0, res.stderr[-3000:]


def test_eval_gate_failure_exits_nonzero(demo_run):
    out, _ = demo_run
    res = run_cli("eval", f"run={out}", "eval.max_samples=2", "eval.max_new_tokens=8",
                  "eval.gates.exact_match=1.0")
    assert res.returncode == 2
    assert "eval.gates.exact_match missed" in res.stderr and "threshold 1.0" in res.stderr
