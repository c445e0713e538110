"""The lm-evaluation-harness bridge, offline: the project's local demo tasks on the embedded tiny model.

The harness must see exactly our model and chat template: its log-likelihoods of the multiple-choice
letters equal our own forward pass, and its greedy answers equal finetune.generate.generation's.
"""
import json

import pytest
import torch

from finetune.data import render_prompt
from finetune.errors import FinetuneError
from finetune.evaluation.harness import DEMO_TASKS, run_benchmarks, summarize, task_manager, write_demo_tasks
from finetune.generate.generation import generate
from finetune.config import to_typed

LIMIT = 4


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("harness")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    cfg = to_typed({"eval": {"tasks": list(DEMO_TASKS), "limit": LIMIT, "batch_size": 4}})
    summary = run_benchmarks(cfg, model, tiny_tokenizer, out, log_samples=True)
    return model, tiny_tokenizer, out, summary


def test_demo_tasks_run_offline_and_report_their_metrics(harness_run):
    _, _, out, summary = harness_run
    assert set(summary) == set(DEMO_TASKS)
    # acc is checked against our own forward pass below; the random tiny model writes no JSON at all, so a
    # metric that compared the reply with itself (or with a doc field other than the target) would show here
    assert summary["finetune_demo_json"]["exact_match"] == 0.0
    saved = json.loads((out / "lm_harness_tuned.json").read_text())
    assert saved["summary"] == summary
    assert {t: len(s) for t, s in saved["samples"].items()} == {t: LIMIT for t in DEMO_TASKS}
    assert (out / "lm_tasks/finetune_demo_city.yaml").is_file()


def loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log-probabilities of `continuation` after `context`, split the way lm-eval splits them:
    trailing whitespace of the context moves to the continuation (here the newline after 'assistant')."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.inference_mode():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_multiple_choice_logliks_are_our_models(harness_run):
    model, tok, out, summary = harness_run
    samples = json.loads((out / "lm_harness_tuned.json").read_text())["samples"]["finetune_demo_city"]
    correct = 0
    for s in samples:
        (prompt, letter), *_ = s["arguments"]
        user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        # the harness rendered our chat template, generation prompt included
        assert prompt == tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        assert [a[1] for a in s["arguments"]] == ["A", "B", "C", "D"]
        ours = [loglik(model, tok, prompt, cont) for _, cont in s["arguments"]]
        theirs = [r[0] for r in s["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct += int(max(range(4), key=ours.__getitem__) == s["target"])
    assert summary["finetune_demo_city"]["acc"] == pytest.approx(correct / len(samples))


def test_generation_task_answers_equal_finetune_generate(harness_run):
    model, tok, out, _ = harness_run
    samples = json.loads((out / "lm_harness_tuned.json").read_text())["samples"]["finetune_demo_json"]
    docs = [s["doc"] for s in samples]
    prompts = [render_prompt(tok, [{"role": "user", "content": f"Extract the fields as one JSON object.\n"
                                                                 f"Input: {d['input']}"}]) for d in docs]
    ours = generate(model, tok, prompts, max_new_tokens=64, batch_size=1)
    for s, g in zip(samples, ours):
        theirs = s["filtered_resps"][0]
        # the harness also cuts at a blank line ("\n\n" in the task's `until`)
        assert theirs == g.text.split("\n\n")[0]


def test_unknown_task_and_missing_task_folder_are_clear_errors(tmp_path):
    with pytest.raises(FinetuneError, match="eval.task_paths: .*not a folder"):
        task_manager(to_typed({"eval": {"tasks": ["finetune_demo_json"], "task_paths": [str(tmp_path / "nope")]}}),
                     tmp_path)
    own = tmp_path / "mine"
    own.mkdir()
    (own / "my_task.yaml").write_text((write_demo_tasks(tmp_path / "demo") / "finetune_demo_json.yaml").read_text()
                                      .replace("task: finetune_demo_json", "task: my_task"))
    manager = task_manager(to_typed({"eval": {"tasks": ["my_task"], "task_paths": [str(own)]}}), tmp_path)
    assert "my_task" in manager.all_tasks
    with pytest.raises(FinetuneError, match="unknown lm-eval task.*'finetune_demo_jsn'.*finetune_demo_json"):
        task_manager(to_typed({"eval": {"tasks": ["finetune_demo_jsn"], "task_paths": [str(own)]}}), tmp_path)


def test_summarize_keeps_metrics_drops_stderr_and_names_filters():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
                         "exact_match,flexible-extract": 0.6}, "mmlu": {"acc,none": 0.7, "acc_stderr,none": 0.01}}
    assert summarize(results) == {"gsm8k": {"exact_match[strict-match]": 0.5, "exact_match[flexible-extract]": 0.6},
                                  "mmlu": {"acc": 0.7}}


def test_eval_lm_harness_puts_benchmarks_for_tuned_and_base_in_the_report(tmp_path, tiny_dir, tiny_tokenizer):
    """`finetune eval eval=lm_harness` wiring: the config group turns the bridge on inside evaluate_run, the
    tuned numbers come from merged/ and the base numbers from the base (here two different models)."""
    import shutil

    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from finetune.evaluation.run import evaluate_run
    from finetune.paths import CONFIG_DIR
    from finetune.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=[
            "eval=lm_harness", "eval.limit=2", "eval.max_samples=2", "eval.max_new_tokens=4", "quant=none",
            "device=cpu", "data.sources=[{path:demo:structured_train.jsonl,format:structured,split:train,"
            "max_samples:2},{path:demo:structured_val.jsonl,format:structured,split:val,max_samples:2}]"])
    cfg = validate(to_typed(raw))
    assert cfg.eval.tasks == list(DEMO_TASKS) and cfg.eval.compare_base
    shutil.copytree(tiny_dir, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # a "tuned" model that is not the base: every weight moved a little
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "merged")
    evaluate_run(cfg, tmp_path)
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert set(report["benchmarks"]) == {"tuned", "base"}
    assert set(report["benchmarks"]["tuned"]) == set(DEMO_TASKS)
    # each side's numbers are those the harness measures on that model alone
    alone = {tag: run_benchmarks(cfg, model, tiny_tokenizer, tmp_path / f"alone_{tag}")
             for tag, model in (("tuned", tuned), ("base", base))}
    assert alone["tuned"] != alone["base"], alone  # the two sides really are different models
    assert report["benchmarks"] == alone
    assert "| finetune_demo_city | acc |" in (tmp_path / "eval/report.md").read_text()
