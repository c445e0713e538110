"""benchmarks/generate_engines.py on the real SmolLM2: a tiny run of every arm. It checks the benchmark's
plumbing (same prompts in both engines, the ratio computed from the arms' own figures), not any speed."""
import json
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.test_export_llama import needs_llama_cpp


@needs_llama_cpp
@pytest.mark.realmodel
def test_generate_engines_smoke():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generate_engines.py"), "--rows", "2",
                           "--new-tokens", "6", "--quants", "f16", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2
    for arm in ("project_batched", "project_b1", "llamacpp_f16"):
        assert 0 < result[f"{arm}_tokens"] <= 12
    # batch 1 and batched greedy decoding of the same fp32 model give the same tokens
    assert result["project_b1_same_outputs"] == "2/2"
    assert result["batched_vs_llamacpp_best"] == pytest.approx(
        result["project_batched_tokens_per_s"] / result["llamacpp_f16_tokens_per_s"], rel=0.02)
