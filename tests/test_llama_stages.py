"""The stages that were only checked on Qwen2, on the Llama architecture with SmolLM2's kind of template (ChatML
with a default system prompt, GPT-2-style tokenizer): schema-constrained `generate`, and the lm-eval bridge
(its log-likelihoods are our model's). The random tiny Llama of tests/llama_support.py stands in for SmolLM2;
tests/test_realmodel_e2e.py runs the real one through train, merge, eval and export."""
import json

import jsonschema
import pytest
import torch

from finetune.data import render_prompt
from finetune.generate.generation import generate, schema_processor_factory
from tests.llama_support import llama_dir  # noqa: F401 (fixture)
from tests.test_constrained import MAX_NEW, SCHEMAS
from tests.test_eval_harness import LIMIT, loglik


@pytest.fixture(scope="module")
def llama(llama_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(llama_dir)


def test_constrained_generate_on_llama_is_valid_and_stops(llama):
    model, tok = llama
    assert model.config.model_type == "llama"
    prompts = [render_prompt(tok, [{"role": "user", "content": f"Reply with JSON number {i}{'!' * i}"}])
               for i in range(len(SCHEMAS))]
    free = generate(model, tok, prompts, max_new_tokens=48, batch_size=4)

    def valid(text, schema):
        try:
            jsonschema.validate(json.loads(text), schema)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    assert not any(valid(g.text, s) for g, s in zip(free, SCHEMAS))  # the random model writes no JSON itself
    factory = schema_processor_factory(tok, SCHEMAS, model.config.vocab_size)
    constrained = generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=4, logits_processor_factory=factory)
    for g, schema in zip(constrained, SCHEMAS):
        assert g.stopped, g.text  # ended at the template's end of turn, not cut by max_new_tokens
        jsonschema.validate(json.loads(g.text), schema)


def test_lm_eval_bridge_on_llama_scores_our_model(llama, tmp_path):
    from finetune.config import to_typed
    from finetune.evaluation.harness import DEMO_TASKS, run_benchmarks

    model, tok = llama
    cfg = to_typed({"eval": {"tasks": list(DEMO_TASKS), "limit": LIMIT, "batch_size": 4}})
    summary = run_benchmarks(cfg, model, tok, tmp_path, log_samples=True)
    assert set(summary) == set(DEMO_TASKS)
    samples = json.loads((tmp_path / "lm_harness_tuned.json").read_text())["samples"]["finetune_demo_city"]
    assert len(samples) == LIMIT
    for s in samples:
        (prompt, _), *_ = s["arguments"]
        # the harness rendered this template, its default system prompt and generation prompt included
        user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert prompt == tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        ours = [loglik(model, tok, prompt, cont) for _, cont in s["arguments"]]
        assert ours == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-3)
