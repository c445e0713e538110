"""`finetune verify`: one parity report across engines (issue 17).

The comparison logic runs on fake engines (plain data: fast, every case constructed on purpose); the adapter and
merged engines run for real on the tiny model, fp32, where greedy outputs must be identical. vLLM itself is in
test_verify_vllm.py (marker `vllm`, `make test-vllm`).
"""
import json
import os

import pytest

from finetune.verify.report import Completion, EngineResult, build_report, compare_pair, markdown, skipped
from tests.support import run_cli

PROMPT = [1, 2, 3]
EOT = 99
THRESHOLDS = {"adapter": 0.99, "gguf": 0.9, "vllm_merged": 0.99, "vllm_lora": 0.99}


def decode(ids):
    return " ".join("<eot>" if i == EOT else f"t{i}" for i in ids)


def engine(name, *completions, **kw):
    return EngineResult(name, f"{name} engine", list(completions), **kw)


def reply(tokens, stop=EOT, prompt=PROMPT, lps=None):
    return Completion(list(prompt), list(tokens), stop, lps)


REF = engine("merged", reply([10, 11, 12, 13]), reply([20, 21]))


def test_identical_engine_passes_with_full_agreement():
    pair = compare_pair(REF, engine("vllm_merged", reply([10, 11, 12, 13]), reply([20, 21])), 0.99, decode)
    assert pair["ok"] and pair["identical_outputs"] == 2 and pair["token_agreement"] == 1.0
    assert pair["same_prompt_ids"] and pair["same_stop"] and pair["failures"] == []
    assert all("first_divergence" not in r for r in pair["rows"])


def test_divergence_is_located_with_context_and_agreement_counts_tokens_before_it():
    other = engine("gguf", reply([10, 11, 50, 51, 52]), reply([20, 21]))
    pair = compare_pair(REF, other, 0.9, decode)
    # prompt 0: 2 tokens match, longer side is 6 (5 tokens + stop); prompt 1: 3 of 3 (stop counted) -> 5 / 9
    assert pair["token_agreement"] == pytest.approx(5 / 9)
    assert pair["identical_outputs"] == 1 and not pair["ok"]
    d = pair["rows"][0]["first_divergence"]
    assert d == {"position": 2, "context": "t10 t11", "reference": "t12 t13 <eot>", "engine": "t50 t51 t52 <eot>"}
    assert pair["rows"][0]["same_stop"] is None  # diverged before the end: the stop check does not apply
    assert "agreement 0.5556 < threshold 0.9 (verify.thresholds.gguf)" in pair["failures"][0]
    assert "prompt 0, token 2, after 't10 t11'" in pair["failures"][0]


def test_agreement_at_the_threshold_passes_and_just_below_fails():
    other = engine("gguf", reply([10, 11, 12, 50]), reply([20, 21]))  # 3 of 5, then 3 of 3 -> 0.75
    assert compare_pair(REF, other, 0.75, decode)["ok"]
    assert not compare_pair(REF, other, 0.76, decode)["ok"]


def test_a_different_rendered_prompt_fails_even_when_the_reply_is_the_same():
    other = engine("vllm_lora", reply([10, 11, 12, 13], prompt=[1, 2, 7]), reply([20, 21]))
    pair = compare_pair(REF, other, 0.5, decode)
    assert pair["token_agreement"] == 1.0 and not pair["ok"] and not pair["same_prompt_ids"]
    assert pair["rows"][0]["prompt_divergence"]["position"] == 2
    assert "renders/tokenizes 1 of 2 prompts differently" in pair["failures"][0]
    assert "chat template or tokenizer" in pair["failures"][0]


def test_an_engine_that_writes_past_the_end_of_turn_fails_the_stop_check():
    # the whole reference reply, then not stopping: the end-of-turn token is not in that engine's stop set
    other = engine("vllm_merged", reply([10, 11, 12, 13, EOT, 5], stop=None), reply([20, 21]))
    pair = compare_pair(REF, other, 0.0, decode)
    assert pair["rows"][0]["same_stop"] is False and not pair["same_stop"] and not pair["ok"]
    assert "does not end the reply where the merged model does" in pair["failures"][0]
    assert f"merged stops with token {EOT}, vllm_merged with max_new_tokens" in pair["failures"][0]


def test_logprob_difference_is_taken_over_shared_top_tokens_up_to_the_divergence():
    ref = engine("merged", reply([10, 11], lps=[{10: -0.1, 4: -3.0}, {11: -0.2}, {EOT: -0.01}]))
    other = engine("gguf", reply([10, 12], lps=[{10: -0.15, 5: -2.0}, {11: -0.5, 12: -0.4}, {EOT: -9.0}]))
    pair = compare_pair(ref, other, 0.0, decode)
    # positions 0 (|-0.1+0.15|) and 1 (the divergence, |-0.2+0.5|); position 2 follows different prefixes
    assert pair["max_abs_logprob_diff"] == pytest.approx(0.3)


def test_skipped_engine_carries_its_install_command_and_does_not_fail_unless_asked():
    engines = [engine("adapter", *REF.completions), skipped("vllm_lora", "vLLM + LoRA", "no vLLM environment found",
                                                           "make vllm-env")]
    report = build_report(REF, engines, THRESHOLDS, decode, run="r")
    assert report["ok"] and report["skipped"] == [{"engine": "vllm_lora", "why": "no vLLM environment found",
                                                   "install": "make vllm-env"}]
    assert report["pairs"][1]["ok"] is None and report["engines"]["vllm_lora"]["status"] == "skipped"
    md = markdown(report)
    assert "| vllm_lora (vLLM + LoRA) | skipped: no vLLM environment found; install: `make vllm-env` |" in md
    assert "**PASS**" in md
    strict = build_report(REF, engines, THRESHOLDS, decode, fail_on_skipped=True)
    assert not strict["ok"] and "make vllm-env" in strict["failures"][0]


def test_an_engine_that_crashed_fails_the_report():
    broken = engine("vllm_merged", error="vLLM exited with code 1: ValueError: unsupported head size")
    report = build_report(REF, [broken], THRESHOLDS, decode, reference_problems=[])
    assert not report["ok"] and "unsupported head size" in report["failures"][0]
    assert "**FAIL**" in markdown(report)


def test_markdown_table_has_one_row_per_engine_with_the_numbers():
    other = engine("gguf", reply([10, 11, 50]), reply([20, 21]))  # 2 of 5, then 3 of 3 -> 0.625
    report = build_report(REF, [engine("adapter", *REF.completions), other], THRESHOLDS, decode, run="outputs/x",
                          prompt_source="val split", max_new_tokens=32)
    md = markdown(report)
    assert md.startswith("# Cross-engine parity: outputs/x")
    assert "| adapter (adapter engine) | 2/2 | 1.0000 | 0.99 | same | same | - | pass |" in md
    assert "| gguf (gguf engine) | 1/2 | 0.6250 | 0.9 | same | same | - | **FAIL** |" in md
    assert "- gguf, prompt 0, token 2: after `'t10 t11'` merged `'t12 t13 <eot>'`, gguf `'t50 <eot>'`" in md


# --- the real transformers engines on the tiny model -------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    """A quant=none run with a random (non-zero) adapter, merged in fp32: adapter and merged must agree exactly."""
    from finetune.merge.stream import merge_adapter
    from tests.test_merge_parity import run_cfg
    from tests.test_merge_weights import make_run

    run = make_run(tmp_path_factory.mktemp("verify") / "run", "quant=none")
    merge_adapter(run_cfg(run, "merge.parity_prompts=0"), run)
    return run


def verify_cfg(run, *overrides):
    from tests.test_merge_parity import run_cfg

    return run_cfg(run, "verify.max_new_tokens=16", "verify.num_prompts=4", *overrides)


def test_adapter_and_merged_model_agree_exactly_in_fp32(merged_run, tmp_path):
    from finetune.verify.run import verify_run

    report = verify_run(verify_cfg(merged_run, "verify.engines=[adapter]", f"verify.output={tmp_path}"), merged_run)
    pair = report["pairs"][0]
    assert report["ok"] and pair["engine"] == "adapter" and pair["status"] == "ran"
    assert pair["identical_outputs"] == pair["prompts"] == 4 and pair["token_agreement"] == 1.0
    assert pair["same_prompt_ids"] and pair["same_stop"]
    assert pair["max_abs_logprob_diff"] < 1e-4  # fp32 rounding between merged and unmerged LoRA, not another model
    assert report["prompt_source"] == "val split" and report["reference"]["engine"] == "merged"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["pairs"][0]["identical_outputs"] == 4 and "| adapter (" in (tmp_path / "report.md").read_text()


def test_fake_engine_below_threshold_fails_after_writing_the_report(merged_run, tmp_path):
    from finetune.verify.run import ParityFailure, verify_run

    def off_by_one(ctx):  # every reply loses its last token and never stops
        ref = ctx["reference"]
        return EngineResult("vllm_merged", "fake", [Completion(c.prompt_ids, c.token_ids[:-1], None)
                                                    for c in ref.completions])

    cfg = verify_cfg(merged_run, "verify.engines=[vllm_merged]", f"verify.output={tmp_path}",
                     "verify.thresholds.vllm_merged=1.0")
    with pytest.raises(ParityFailure, match="vllm_merged: greedy-token agreement"):
        verify_run(cfg, merged_run, engines={"vllm_merged": off_by_one})
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and report["pairs"][0]["token_agreement"] < 1.0


def test_command_reports_missing_engines_as_skipped_with_install_commands(merged_run, tmp_path):
    # cwd has no .venv-vllm and no vLLM python is configured; the run has no GGUF export
    res = run_cli("verify", f"run={merged_run}", "verify.num_prompts=2", "verify.max_new_tokens=8",
                  f"verify.output={tmp_path}/v", "verify.engines=[gguf,vllm_merged,vllm_lora]",
                  cwd=tmp_path, env={"FINETUNE_VLLM_PYTHON": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["ok"] and set(summary["skipped"]) == {"gguf", "vllm_merged", "vllm_lora"}
    assert "make vllm-env" in summary["skipped"]["vllm_merged"] and "make vllm-env" in summary["skipped"]["vllm_lora"]
    assert "finetune export" in summary["skipped"]["gguf"] or "make test-llamacpp" in summary["skipped"]["gguf"]
    assert "verify: vllm_merged skipped: no vLLM environment found; install: make vllm-env" in res.stdout + res.stderr
    assert "skipped" in (tmp_path / "v" / "report.md").read_text()


def test_command_exits_2_without_traceback_when_the_merged_weights_are_wrong(merged_run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(merged_run, run)
    weights = run / "merged" / "model.safetensors"
    tensors = load_file(weights)
    for name in tensors:  # the merged layers without their MLP: not what the adapter computes
        if "mlp.down_proj" in name:
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    res = run_cli("verify", f"run={run}", "verify.engines=[adapter]", "verify.num_prompts=4",
                  "verify.max_new_tokens=16", env={"FINETUNE_VLLM_PYTHON": ""})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "error: engines disagree with the merged model" in res.stderr and "Traceback" not in res.stderr
    assert "adapter: greedy-token agreement" in res.stderr
    assert "**FAIL**" in (run / "verify" / "report.md").read_text()


def test_bad_verify_settings_are_config_errors():
    from finetune.config import VerifyConfig

    cfg = VerifyConfig(engines=["adapter", "tgi"], top_logprobs=50, dtype="float16")
    cfg.thresholds.gguf = 1.5
    problems = "\n".join(cfg.problems())
    assert "unknown engine(s) 'tgi'" in problems and "verify.top_logprobs=50" in problems
    assert "verify.dtype='float16'" in problems and "verify.thresholds.gguf=1.5" in problems


def test_vllm_python_is_found_from_config_then_environment(tmp_path, monkeypatch):
    from finetune.verify.vllm_engine import max_lora_rank, vllm_python

    py = tmp_path / "python"
    py.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINETUNE_VLLM_PYTHON", str(py))
    assert vllm_python(None) == py and vllm_python(str(tmp_path / "missing")) == py
    monkeypatch.delenv("FINETUNE_VLLM_PYTHON")
    assert vllm_python(None) is None
    assert os.path.samefile(vllm_python(str(py)), py)
    assert (max_lora_rank(4), max_lora_rank(16), max_lora_rank(17), max_lora_rank(1024)) == (8, 16, 32, None)
