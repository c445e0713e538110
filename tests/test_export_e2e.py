"""Train the demo, then `finetune export` its merged model: the whole user path of issue 9 (slow: ~1 min)."""
import json

import gguf
import pytest

from tests.support import run_cli


@pytest.mark.slow
def test_train_then_export_f16_and_q8_0(tmp_path):
    run = tmp_path / "run"
    res = run_cli("train", "experiment=tiny_demo", "name=demo", f"hydra.run.dir={run}", "eval.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]
    reports = {}
    for quant in ("f16", "q8_0"):
        res = run_cli("export", f"run={run}", f"export.quant={quant}")
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        out = run / "export" / f"gguf-{quant}"
        assert summary["export"] == str(out / f"demo-{quant}.gguf") and summary["modelfile"] == str(out / "Modelfile")
        v = json.loads((out / "export.json").read_text())["verification"]
        assert v["prompt_source"] == "val split" and v["prompts"] == 4 and v["tokenizer_identical"]
        assert v["reader"] in ("llama_cpp", "transformers")  # llama.cpp when llama-cpp-python is installed
        r = gguf.GGUFReader(out / f"demo-{quant}.gguf")
        assert r.fields["tokenizer.chat_template"].contents() == (run / "merged" / "chat_template.jinja").read_text()
        reports[quant] = (v, summary, res.stdout + res.stderr)
    # f16 is all but lossless: the reader generates exactly what transformers generates
    v16 = reports["f16"][0]
    assert v16["identical_greedy_outputs"] == 4 and v16["ok"], v16
    # q8_0 rounds every weight: on the briefly trained demo model, whose top logits are close, a greedy token may
    # flip after some tokens (measured: 0-4 of 4 rows identical, differing after 10-31 tokens). What must hold:
    # the logits stay close, and a difference is reported, never passed off as ok.
    v8, summary8, printed8 = reports["q8_0"]
    assert v8["max_abs_logit_diff"] < 0.02 * v8["max_abs_logit"], v8  # measured 0.7%; a broken layout is ~100%
    assert v8["ok"] == (v8["identical_greedy_outputs"] == 4)
    if not v8["ok"]:
        assert "differs from the merged model's" in summary8["warning"]
        assert f"[finetune.export.run][WARNING] - {summary8['warning']}" in printed8  # logged, not only in the JSON
