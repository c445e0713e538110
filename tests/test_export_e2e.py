"""Train the demo, then `finetune export` its merged model: the whole user path of issue 9 (slow: ~1 min)."""
import json

import gguf
import pytest

from tests.support import run_cli


@pytest.mark.slow
def test_train_then_export_q8_0(tmp_path):
    run = tmp_path / "run"
    res = run_cli("train", f"hydra.run.dir={run}", "eval.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("export", f"run={run}", "export.quant=q8_0")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    out = run / "export" / "gguf-q8_0"
    assert summary["export"] == str(out / "demo-q8_0.gguf") and summary["modelfile"] == str(out / "Modelfile")
    report = json.loads((out / "export.json").read_text())
    v = report["verification"]
    assert v["prompt_source"] == "val split" and v["prompts"] == 4 and v["tokenizer_identical"]
    assert v["reader"] in ("llama_cpp", "transformers")  # llama.cpp when llama-cpp-python is installed
    assert v["identical_greedy_outputs"] == 4 and v["ok"], v
    r = gguf.GGUFReader(out / "demo-q8_0.gguf")
    assert r.fields["tokenizer.chat_template"].contents() == (run / "merged" / "chat_template.jinja").read_text()
