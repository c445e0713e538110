"""Checks that need no weights run before any model loads (issue 18)."""
import json

import pytest

import finetune.generate.generation as generation
from finetune.config import FinetuneConfig
from finetune.errors import DataError


def test_constrained_generation_without_schemas_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Extract: Ada is 36."}) + "\n")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(generation, "load_generation_model", no_load)
    cfg = FinetuneConfig()
    cfg.generate.prompts, cfg.generate.constrain = str(prompts), "json_schema"
    with pytest.raises(DataError, match="1 prompt\\(s\\) have no 'schema'.*p.jsonl:1"):
        generation.generate_run(cfg, tmp_path)
