"""evaluate_model / evaluate_run on the embedded tiny model: loss, scoring wiring, base vs tuned, report,
checkpoint plot, gates through the CLI. The "run" is made by hand (no training): its merged/ is the base."""
import json
import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import finetune.generate.generation
from tests.support import run_cli
from finetune.data import build_datasets
from finetune.evaluation.run import GateFailure, evaluate_model, evaluate_run, target_loss
from finetune.generate.generation import Generation
from finetune.paths import CONFIG_DIR
from finetune.config import register_configs, to_typed, validate

register_configs()
SOURCES = ("data.sources=[{path:demo:structured_train.jsonl,format:structured,split:train,max_samples:4},"
           "{path:demo:structured_val.jsonl,format:structured,split:val,max_samples:5},"
           "{path:demo:instruct_val.jsonl,format:messages,split:val,max_samples:3}]")


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=["quant=none", "device=cpu", "eval.max_new_tokens=12",
                                                       SOURCES, *overrides])
    return raw, validate(to_typed(raw))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("evalrun")
    raw, _ = make_cfg()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
    shutil.copytree(tiny_dir, out / "merged")
    return out


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_dir, model_and_val):
    """A run whose merged/ really differs from the base: the tiny model trained (all weights, fp32) on the val
    rows' label tokens, so it must score better than the base on exactly those rows."""
    from transformers import AutoModelForCausalLM

    _, _, val = model_and_val
    out = tmp_path_factory.mktemp("tunedrun")
    raw, _ = make_cfg()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
    shutil.copytree(tiny_dir, out / "merged")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = [masked_labels(dict(r)) for r in val]
    for _ in range(40):
        for ids, labels in batch:
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out / "merged")
    return out


@pytest.fixture(scope="module")
def model_and_val(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    _, cfg = make_cfg()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return model, tiny_tokenizer, build_datasets(cfg.data, tiny_tokenizer).val


def masked_labels(row):
    ids = torch.tensor([row["input_ids"]])
    return ids, torch.where(torch.tensor([row["assistant_masks"]]) > 0, ids, -100)


def test_target_loss_equals_transformers_loss_token_weighted(model_and_val):
    model, _, val = model_and_val
    rows = [dict(r) for r in val][:3]
    sums, counts = [], []
    for r in rows:
        ids, labels = masked_labels(r)
        with torch.inference_mode():
            ref = model(input_ids=ids, labels=labels).loss.item()
        assert target_loss(model, [r])["target_loss"] == pytest.approx(ref, rel=1e-5)
        n = int((labels[0, 1:] != -100).sum())
        sums.append(ref * n)
        counts.append(n)
    batched = target_loss(model, rows, tokens_per_batch=10_000)  # one padded batch
    one_by_one = target_loss(model, rows, tokens_per_batch=1)  # one row per forward
    assert batched["target_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert one_by_one["target_loss"] == pytest.approx(batched["target_loss"], rel=1e-5)
    assert batched["target_tokens"] == sum(counts)
    assert batched["target_perplexity"] == pytest.approx(torch.tensor(batched["target_loss"]).exp().item())


def test_target_loss_scored_in_the_generation_prefill_equals_its_own_pass(model_and_val, caplog):
    """eval scores each target teacher-forced in the prefill that starts its generation: the loss equals
    target_loss()'s separate pass and the replies equal those of a plain prefill (fp32, batches of 3 and 8)."""
    from finetune.generate.generation import can_share_prefill

    model, tok, val = model_and_val
    assert can_share_prefill(model) is None
    rows = [dict(r) for r in val]
    reference = target_loss(model, rows)
    for batch in (3, 8):
        _, plain_cfg = make_cfg("eval.loss=false", f"eval.batch_size={batch}")
        _, cfg = make_cfg(f"eval.batch_size={batch}")
        plain, plain_preds = evaluate_model(model, tok, val, plain_cfg)
        with caplog.at_level("INFO", logger="finetune.eval"):
            shared, preds = evaluate_model(model, tok, val, cfg)
        # the multi-turn row has a labelled reply inside its prompt: scored by target_loss() alone
        assert "target loss of 7 rows scored in the same prefill; the other 1 in" in caplog.text
        assert shared["target_tokens"] == reference["target_tokens"] > 0
        assert shared["target_loss"] == pytest.approx(reference["target_loss"], rel=1e-5)
        assert shared["target_perplexity"] == pytest.approx(reference["target_perplexity"], rel=1e-5)
        assert [p["generated"] for p in preds] == [p["generated"] for p in plain_preds]
        assert "target_loss" not in plain


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_the_cut_back_prefill_cache_continues_like_a_plain_prefill(model_and_val, impl):
    """The cache _prefill_scoring leaves holds the prompt but its last column, with the positions a plain
    left-padded prefill gives: feeding that column next reproduces the plain prefill's next-token logits.
    sdpa runs the rows packed (per-document attention, keys copied into the padded layout); eager padded."""
    from finetune.data import render_prompt
    from finetune.evaluation.run import _continuations
    from finetune.generate.generation import _cache_kwarg, _prefill_scoring

    model, tok, val = model_and_val
    rows = [dict(r) for r in val][:3]
    prompts = [render_prompt(tok, json.loads(r["messages"])[:-1]) for r in rows]
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    _ck = _cache_kwarg(model)
    before = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        with torch.inference_mode():
            cache, nll = _prefill_scoring(model, ids, mask, _continuations(rows, prompts))
            assert model.config._attn_implementation == impl  # sdpa_packed only inside the call
            assert cache.get_seq_length() == width - 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], **{_ck: cache})
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        model.set_attn_implementation(before)
    assert torch.allclose(nxt.logits[:, -1], ref.logits[:, -1], atol=1e-5)
    loss = target_loss(model, rows)
    assert sum(n for _, n in nll) == loss["target_tokens"]
    assert sum(x for x, _ in nll) / loss["target_tokens"] == pytest.approx(loss["target_loss"], rel=1e-5)


def test_models_whose_cache_or_head_the_shared_prefill_cannot_handle_are_refused(model_and_val):
    from finetune.generate.generation import can_share_prefill

    model, _, _ = model_and_val
    text = model.config.get_text_config()
    try:
        text.final_logit_softcapping = 30.0
        assert "final_logit_softcapping" in can_share_prefill(model)
        text.final_logit_softcapping = None
        text.layer_types = ["full_attention", "sliding_attention"]
        assert "sliding" in can_share_prefill(model)
    finally:
        text.final_logit_softcapping = None
        text.layer_types = ["full_attention"] * text.num_hidden_layers


def test_each_row_is_scored_against_its_own_target(model_and_val, monkeypatch):
    """A generator that answers every prompt with that row's target scores 1.0 everywhere; one that swaps
    a field loses exactly that field. The prompt it sees must not already contain the reply."""
    model, tok, val = model_and_val
    _, cfg = make_cfg()
    by_user = {json.loads(r["messages"])[-2]["content"]: r["target"] for r in val}
    seen = []

    def oracle(model, tokenizer, prompts, **kw):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            assert text.endswith("<|im_start|>assistant\n")  # generation prompt, nothing of the reply
            (target,) = [t for u, t in by_user.items() if u in text]
            seen.append(text)
            out.append(Generation(edit(target), 5, True))
        return out

    monkeypatch.setattr(finetune.generate.generation, "generate", oracle)
    edit = lambda t: t  # noqa: E731
    metrics, preds = evaluate_model(model, tok, val, cfg)
    assert len(seen) == len(val) == metrics["rows"] == 8
    for name in ("exact_match", "normalized_match", "json_valid_rate", "schema_valid_rate", "field_f1", "stopped_rate"):
        assert metrics[name] == 1.0, name
    assert metrics["chrf"] == 100.0 and metrics["rows_structured"] == 5 and metrics["rows_text"] == 3
    assert [p["target"] for p in preds] == [r["target"] for r in val]

    edit = lambda t: re.sub(r'("age": ?)(\d)', r"\g<1>1\2", t)  # noqa: E731  one wrong field per person row
    metrics, preds = evaluate_model(model, tok, val, cfg)
    people = sum('"age"' in r["target"] for r in val if r["task"] == "structured")
    gold_fields = sum(len(json.loads(r["target"])) for r in val if r["task"] == "structured")
    assert metrics["exact_match"] == pytest.approx((8 - people) / 8)
    assert metrics["field_recall"] == pytest.approx((gold_fields - people) / gold_fields)


def test_schema_constrained_rows_start_as_json_and_text_rows_are_unchanged(model_and_val):
    model, tok, val = model_and_val
    _, free_cfg = make_cfg()
    _, cons_cfg = make_cfg("eval.constrain=json_schema")
    _, free = evaluate_model(model, tok, val, free_cfg)
    _, cons = evaluate_model(model, tok, val, cons_cfg)
    for f, c in zip(free, cons):
        if c["task"] == "structured":
            assert c["generated"].startswith("{"), c["generated"]
            if c["stopped"]:  # a finished constrained value is valid by construction
                assert c["json_valid"] == 1.0 and c["schema_valid"] == 1.0
        else:
            assert c["generated"] == f["generated"]
    assert any(f["generated"] != c["generated"] for f, c in zip(free, cons) if c["task"] == "structured")


def test_report_compares_base_and_tuned(tuned_run, model_and_val):
    """merged/ was trained on the val rows: the report's base must be the untuned model's scores, its tuned the
    merged model's, and the change tuned minus base, better where training made it better."""
    base_model, tok, val = model_and_val
    _, cfg = make_cfg("eval.examples=2", "eval.max_new_tokens=64")
    metrics = evaluate_run(cfg, tuned_run)
    report = json.loads((tuned_run / "eval/report.json").read_text())
    assert report["metrics"] == metrics and metrics["rows"] == report["base"]["rows"] == 8
    base_metrics, base_preds = evaluate_model(base_model, tok, val, cfg)  # the base, scored on its own
    timing = "generated_tokens_per_s"
    assert {k: v for k, v in report["base"].items() if k != timing} == \
        {k: v for k, v in base_metrics.items() if k != timing}
    assert report["delta"].keys() == {k for k in metrics if not k.startswith("rows")}
    for k, change in report["delta"].items():
        assert change == pytest.approx(metrics[k] - report["base"][k], abs=1e-12), k
    # trained on these very rows: the tuned model is better on them
    assert report["delta"]["target_loss"] < -1.0 and metrics["target_loss"] < 0.5 * report["base"]["target_loss"]
    assert report["delta"]["exact_match"] > 0 and report["delta"]["chrf"] > 0
    preds = [json.loads(line) for line in (tuned_run / "eval/predictions.jsonl").read_text().splitlines()]
    assert [p["base"]["generated"] for p in preds] == [b["generated"] for b in base_preds]
    assert sum(p["generated"] != p["base"]["generated"] for p in preds) >= 4
    md = (tuned_run / "eval/report.md").read_text()
    assert "| metric | base | tuned | change |" in md
    em = next(line for line in md.splitlines() if line.startswith("| exact_match |"))
    assert f"{report['base']['exact_match']:.4f}" in em and f"{metrics['exact_match']:.4f}" in em
    assert md.count("expected: ") == 4 and "### Worst" in md


def test_report_of_a_run_whose_merged_model_is_the_base_shows_no_change(run):
    _, cfg = make_cfg("eval.examples=2")
    evaluate_run(cfg, run)
    report = json.loads((run / "eval/report.json").read_text())
    assert {k: v for k, v in report["delta"].items() if k != "generated_tokens_per_s"} == \
        {k: 0.0 for k in report["delta"] if k != "generated_tokens_per_s"}
    assert "target_loss" in report["delta"] and "field_f1" in report["delta"] and "chrf" in report["delta"]
    preds = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(p["generated"] == p["base"]["generated"] for p in preds)
    md = (run / "eval/report.md").read_text()
    assert md.count("expected: ") == 4 and ("[-" in md or "{+" in md)


def test_gates_stop_the_run_after_the_report_is_written(run):
    _, cfg = make_cfg("eval.compare_base=false", "eval.gates.exact_match=0.5", "eval.gates.max_target_loss=100")
    with pytest.raises(GateFailure) as e:
        evaluate_run(cfg, run)
    assert "eval.gates.exact_match missed" in str(e.value) and "max_target_loss" not in str(e.value)
    report = json.loads((run / "eval/report.json").read_text())
    assert report["gates"] == {"exact_match": 0.5, "max_target_loss": 100.0} and len(report["gates_missed"]) == 1
    assert "base" not in report


def test_checkpoints_are_scored_and_plotted(run, tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for step, seed in ((2, 1), (4, 2)):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        # init_lora_weights=False: random B, so each checkpoint really changes the model
        peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        peft_model.save_pretrained(run / f"checkpoints/checkpoint-{step}")
    shutil.copytree(run / "checkpoints/checkpoint-4", run / "adapter", dirs_exist_ok=True)
    _, cfg = make_cfg("eval.checkpoints=true")
    evaluate_run(cfg, run)
    report = json.loads((run / "eval/report.json").read_text())
    steps = [h["step"] for h in report["checkpoints"]]
    assert steps == [0, 2, 4]
    losses = [h["metrics"]["target_loss"] for h in report["checkpoints"]]
    assert losses[0] == report["base"]["target_loss"] and losses[1] != losses[0]  # checkpoint-2 really merged
    # checkpoint-4 holds the run's adapter (the one merged/ came from): its step reuses the tuned metrics
    assert report["checkpoints"][-1]["metrics"] == report["metrics"]
    png = run / "plots/eval_metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "../plots/eval_metrics.png" in (run / "eval/report.md").read_text()


def test_cli_gate_miss_exits_2_naming_gate_threshold_and_value(run):
    res = run_cli("eval", f"run={run}", "eval.compare_base=false", "eval.max_new_tokens=4",
                  "eval.gates.json_valid_rate=0.98", "eval.gates.stopped_rate=0")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "eval.gates.json_valid_rate missed: json_valid_rate = 0.0000 < threshold 0.98" in res.stderr
    assert "stopped_rate" not in res.stderr.split("quality gate missed")[1]
    assert "Traceback" not in res.stderr


def test_sampling_is_opt_in_and_seeded(model_and_val):
    model, tok, val = model_and_val
    _, greedy = make_cfg()
    _, sampled = make_cfg("eval.do_sample=true", "eval.temperature=1.5", "eval.seed=3", "eval.loss=false")
    texts = lambda cfg: [p["generated"] for p in evaluate_model(model, tok, val, cfg)[1]]  # noqa: E731
    assert texts(sampled) == texts(sampled)  # same seed, same draws: tuned and base see the same luck
    assert texts(sampled) != texts(greedy) and texts(greedy) == texts(greedy)


def test_base_scores_are_reused_until_something_they_depend_on_changes(run, monkeypatch, tmp_path, caplog):
    """The second evaluation of the same base on the same rows loads no base and reports the same base scores;
    other rows or settings, eval.base_cache=false and a damaged entry each score the base again."""
    import finetune.evaluation.base_cache as base_cache
    import finetune.models.load

    monkeypatch.setattr(base_cache, "entry_path", lambda key: tmp_path / f"{key}.json")
    loads = []
    real_load = finetune.models.load.load_base_model

    def counting_load(*a, **kw):
        loads.append(1)
        return real_load(*a, **kw)

    monkeypatch.setattr(finetune.models.load, "load_base_model", counting_load)
    caplog.set_level("INFO", logger="finetune.eval")

    def evaluate(*overrides):
        loads.clear()
        evaluate_run(make_cfg("eval.examples=1", *overrides)[1], run)
        report = json.loads((run / "eval/report.json").read_text())
        preds = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
        return report, [p["base"] for p in preds], len(loads)

    first, first_preds, n = evaluate()
    assert n == 1 and "base_cached" not in first and len(list(tmp_path.glob("*.json"))) == 1
    again, again_preds, n = evaluate()
    assert n == 0 and again["base"] == first["base"] and again_preds == first_preds
    speed = "generated_tokens_per_s"  # the tuned model's speed differs between runs
    scores = lambda m: {k: v for k, v in m.items() if k != speed}  # noqa: E731
    assert scores(again["delta"]) == scores(first["delta"])
    assert again["base_cached"].startswith(str(tmp_path))
    assert "Base scores reused" in (run / "eval/report.md").read_text()
    assert "base scores of 8 rows reused" in caplog.text

    # a setting that changes generation, fewer rows: scored again, each under its own entry
    for overrides, entries in ((["eval.max_new_tokens=8"], 2), (["eval.max_samples=5"], 3)):
        report, _, n = evaluate(*overrides)
        assert n == 1 and "base_cached" not in report and len(list(tmp_path.glob("*.json"))) == entries
    # a gate is applied after scoring: the entry still holds
    assert evaluate("eval.gates.max_target_loss=1000")[2] == 0
    # off: scored again, nothing written
    for f in tmp_path.glob("*.json"):
        f.unlink()
    assert evaluate("eval.base_cache=false")[2] == 1 and not list(tmp_path.glob("*.json"))
    # a damaged entry: scored again and rewritten
    evaluate()
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"metrics": {}, "predictions": [')
    report, preds, n = evaluate()
    assert n == 1 and scores(report["base"]) == scores(first["base"]) and "is damaged" in caplog.text
    assert json.loads(entry.read_text())["predictions"] == preds


def test_base_cache_key_follows_the_base_weights_and_the_tokenizer(run, tmp_path):
    """A rewritten weight file or another chat template is another key; the same inputs give the same key."""
    import finetune.evaluation.base_cache as base_cache

    _, cfg = make_cfg()
    base = tmp_path / "base"
    shutil.copytree(run / "merged", base)
    cfg.model.name_or_path = str(base)
    rows = [{"messages": "[]", "target": "x"}]

    def key(tok_dir=base):
        return base_cache.cache_key(cfg, rows, tok_dir, "cpu", torch.float32)[0]

    k = key()
    assert key() == k
    weights = next(base.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, rewritten: a new mtime
    k2 = key()
    assert k2 != k
    template = base / "tokenizer_config.json"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    k3 = key()
    assert k3 != k2
    rows[0]["target"] = "y"
    assert key() != k3
    cfg.model.name_or_path = "no-such-org/no-such-model"  # not in the local Hub cache: not cacheable
    assert base_cache.cache_key(cfg, rows, base, "cpu", torch.float32) is None


def test_cli_eval_starts_from_the_runs_own_eval_settings(run, tmp_path):
    """`finetune eval run=X` decodes and gates as X's own evaluation did, with the command line's eval.* on
    top; `eval=<option>` composes the group afresh."""
    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("eval", "plots", "checkpoints"))
    raw, _ = make_cfg("eval.max_new_tokens=6", "eval.compare_base=false", "eval.max_samples=3",
                      "eval.gates.json_valid_rate=0.98")
    (mine / "config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))

    res = run_cli("eval", f"run={mine}", "eval.max_samples=2")
    assert res.returncode == 2 and "eval.gates.json_valid_rate missed" in res.stderr, res.stderr[-3000:]
    report = json.loads((mine / "eval/report.json").read_text())
    assert report["settings"]["max_new_tokens"] == 6 and report["metrics"]["rows"] == 2
    assert "base" not in report and report["gates"] == {"json_valid_rate": 0.98}

    res = run_cli("eval", f"run={mine}", "eval.gates.json_valid_rate=null", "eval.max_samples=2")  # gate dropped
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((mine / "eval/report.json").read_text())
    assert report["gates"] == {} and report["settings"]["max_new_tokens"] == 6

    res = run_cli("eval", f"run={mine}", "eval=default", "eval.compare_base=false", "eval.max_samples=2",
                  "eval.max_new_tokens=5")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((mine / "eval/report.json").read_text())
    assert report["settings"]["max_new_tokens"] == 5 and report["gates"] == {}
