"""The merged folder is self-contained and written safely (issue items 1, 3 and 7), through the real command."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import run_cli
from finetune.errors import FinetuneError
from finetune.merge.stream import merge_adapter
from tests.test_merge_parity import run_cfg
from tests.test_merge_weights import make_run

PROMPTS = [{"prompt": "Write a short greeting."},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
           {"prompt": "Give me a JSON object with a name."}]


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("art") / "run")
    (run / "data").mkdir()
    (run / "data" / "stats.json").write_text(json.dumps({"rows_read": 136, "rows_kept": 130, "label_tokens": 2708,
                                                         "max_length": 512}))
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"metrics": {"exact_match": 0.625, "rows": 24}}))
    res = run_cli("merge", f"run={run}", "merge.parity_max_new_tokens=8")
    assert res.returncode == 0, res.stderr[-3000:]
    return run, json.loads(res.stdout.strip().splitlines()[-1])


def test_merge_command_prints_the_parity_summary(merged_run):
    run, summary = merged_run
    parity = json.loads((run / "merged" / "parity.json").read_text())
    # merge.base=auto after nf4 training: the round trip the adapter was trained against
    assert summary["merged"] == str(run / "merged") and summary["base"] == parity["merge"]["base"] == "nf4_roundtrip"
    for key in ("greedy_token_agreement", "max_abs_logit_diff", "identical_greedy_outputs", "ok", "warning"):
        assert summary[key] == parity[key], key  # the printed line is the report's, not a stand-in
    assert summary["prompts"] == len(parity["rows"]) == 8
    # the agreement is over every scored position of every prompt, and `ok` is its threshold test
    rows = parity["rows"]
    assert parity["positions"] == sum(r["positions"] for r in rows) >= 8
    assert parity["greedy_token_agreement"] == pytest.approx(sum(r["agreeing"] for r in rows) / parity["positions"])
    assert parity["ok"] == (parity["greedy_token_agreement"] >= parity["threshold"])
    assert parity["identical_greedy_outputs"] == sum(r["identical_greedy_output"] for r in rows)


def test_artifact_is_self_contained(merged_run):
    run, _ = merged_run
    out = run / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "parity.json"):
        assert (out / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(run / "adapter").chat_template  # training's template
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert not list(run.glob(".merged.*"))  # no temporary folder left behind


def test_model_card_names_base_data_config_and_eval_metrics(merged_run):
    run, _ = merged_run
    card = (run / "merged" / "README.md").read_text()
    assert "embedded:tiny" in card  # base model
    assert "demo:structured_train.jsonl" in card and "rows kept 130 of 136" in card  # data
    assert "LoRA r 16" in card and "quantization during training: nf4" in card  # config
    assert "| exact_match | 0.6250 |" in card  # eval metrics from <run>/eval/report.json
    assert "greedy-token agreement" in card  # parity


def test_plain_transformers_gives_the_same_greedy_output_as_finetune_generate(merged_run, tmp_path):
    run, _ = merged_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "gen.jsonl"
    res = run_cli("generate", f"run={run}", f"generate.prompts={prompts}", f"generate.output={out}",
                  "generate.max_new_tokens=12")
    assert res.returncode == 0, res.stderr[-3000:]
    ours = [json.loads(line) for line in out.read_text().splitlines()]

    model = AutoModelForCausalLM.from_pretrained(run / "merged")  # nothing of ours: plain transformers
    tok = AutoTokenizer.from_pretrained(run / "merged")
    for row, mine in zip(PROMPTS, ours):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=12)  # greedy and eos ids from generation_config.json
        new = gen[0, ids["input_ids"].shape[1]:]
        assert tok.decode(new, skip_special_tokens=True) == mine["generated"]
        assert mine["new_tokens"] > 0


def test_existing_output_is_refused_then_replaced_with_overwrite(merged_run):
    run, _ = merged_run
    with pytest.raises(FinetuneError, match="already exists.*merge.overwrite=true"):
        merge_adapter(run_cfg(run, "merge.parity_prompts=0"), run)
    (run / "merged" / "stale.txt").write_text("from an older merge")
    out = merge_adapter(run_cfg(run, "merge.parity_prompts=0", "merge.overwrite=true"), run)
    assert out == run / "merged" and not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not list(run.glob(".merged.*"))


def test_a_crash_leaves_the_old_output_and_no_half_written_folder(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "quant=none")
    import finetune.merge.stream

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the shards were written")

    monkeypatch.setattr(finetune.merge.stream, "parity_report", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_adapter(run_cfg(run), run)
    assert not (run / "merged").exists() and not list(run.glob(".merged*"))

    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")  # a previous merge
    with pytest.raises(RuntimeError, match="simulated"):
        merge_adapter(run_cfg(run, "merge.overwrite=true"), run)
    assert (run / "merged" / "config.json").read_text() == "{}" and not list(run.glob(".merged*"))


def test_explicit_adapter_and_base_without_a_run(tmp_path):
    from finetune.cli import setup
    from tests.test_merge_weights import compose_config

    run = make_run(tmp_path / "run", "quant=none")
    cfg = setup(compose_config("quant=none", "model=tiny", f"merge.adapter={run / 'adapter'}",
                               f"merge.output={tmp_path / 'exported'}", "merge.parity_max_new_tokens=4"))
    out = merge_adapter(cfg, None)
    assert out == tmp_path / "exported"
    assert json.loads((out / "parity.json").read_text())["identical_greedy_outputs"] == 8
    wrong_quant = setup(compose_config("quant=nf4", f"merge.adapter={run / 'adapter'}",
                                       f"merge.output={tmp_path / 'x'}"))
    with pytest.raises(FinetuneError, match="trained with quant=none but the config says quant=nf4"):
        merge_adapter(wrong_quant, None)


def test_bad_adapter_inputs_fail_with_what_and_where(tmp_path):
    run = make_run(tmp_path / "run", "quant=none")
    shutil.copytree(run / "adapter", tmp_path / "partial")
    (tmp_path / "partial" / "adapter_model.safetensors").unlink()
    with pytest.raises(FinetuneError, match="partial: adapter_model.safetensors is missing"):
        merge_adapter(run_cfg(run, f"merge.adapter={tmp_path / 'partial'}"), run)
    shutil.rmtree(run / "adapter")
    with pytest.raises(FinetuneError, match=r"run=.* has no adapter/ folder"):
        merge_adapter(run_cfg(run), run)


def test_cli_errors_are_one_clear_line_without_traceback(tmp_path):
    run = make_run(tmp_path / "run", "quant=none")
    shutil.rmtree(run / "adapter")
    res = run_cli("merge", f"run={run}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no adapter/ folder" in res.stderr and "finetune train" in res.stderr
    res = run_cli("merge", f"hydra.run.dir={tmp_path / 'log'}")  # neither a run nor an adapter
    assert res.returncode == 2 and "merge.adapter=" in res.stderr and "Traceback" not in res.stderr


def test_model_card_is_refreshed_with_later_eval_metrics(merged_run, tmp_path):
    from finetune.merge.stream import write_model_card

    run = tmp_path / "run"
    shutil.copytree(merged_run[0], run)
    report = {"metrics": {"exact_match": 0.75, "json_valid_rate": 1.0}, "base": {"exact_match": 0.125}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    write_model_card(run / "merged", run)  # what `finetune eval` calls after writing its report
    card = (run / "merged" / "README.md").read_text()
    assert "| exact_match | 0.7500 | 0.1250 |" in card and "| json_valid_rate | 1.0000 |  |" in card
    assert "0.6250" not in card
