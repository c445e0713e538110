"""The merge and generation paths on CUDA: bf16 merge of an nf4 QLoRA adapter, parity, batched generation.

Run on a GPU machine with `python -m pytest -q -m gpu tests/test_merge_gpu.py` (about a minute).
"""
import json

import pytest
import torch

from finetune.generate.generation import generate, load_merged
from finetune.merge.stream import merge_adapter
from tests.test_merge_parity import run_cfg
from tests.test_merge_weights import make_run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.fail("marked gpu: run it where CUDA is available (it is deselected by default)")
    return make_run(tmp_path_factory.mktemp("gpu") / "run")  # nf4, as the demo


def test_bf16_merge_on_cuda_and_nf4_roundtrip_parity(run, tmp_path):
    original = json.loads((merge_adapter(run_cfg(run, "device=cuda"), run) / "parity.json").read_text())
    roundtrip = json.loads((merge_adapter(run_cfg(run, "device=cuda", "merge.base=nf4_roundtrip"), run,
                                          output=tmp_path / "rt") / "parity.json").read_text())
    assert original["merge"]["dtype"] == roundtrip["merge"]["dtype"] == "bfloat16"  # merge.dtype=auto on CUDA
    assert roundtrip["greedy_token_agreement"] >= original["greedy_token_agreement"]
    assert roundtrip["max_abs_logit_diff"] < original["max_abs_logit_diff"]


def test_batched_generation_on_cuda_matches_one_by_one(run, tmp_path):
    from finetune.data import render_prompt

    out = merge_adapter(run_cfg(run, "device=cuda", "merge.parity_prompts=0"), run, output=tmp_path / "m")
    model, tok = load_merged(out, "cuda", torch.float32)
    prompts = [render_prompt(tok, [{"role": "user", "content": c}])
               for c in ("Hi", "Name three colours.", "Extract the age: Ada is 36.")]
    batched = generate(model, tok, prompts, max_new_tokens=16)
    single = generate(model, tok, prompts, max_new_tokens=16, batch_size=1)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
