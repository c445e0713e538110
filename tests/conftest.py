"""Shared test setup: CPU only, no network, one cache for the embedded model across the session."""
import os

import pytest

from tests.support import REPO

os.environ.setdefault("FINETUNE_CACHE", str(REPO / ".cache" / "test"))
os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach the hub fails loudly instead of downloading
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# compute_dtype=auto picks bf16 on CPUs where it measures faster (finetune/models/cpu.py); recorded losses and
# fp32 parity checks need the same fp32 compute on every machine.
os.environ.setdefault("FINETUNE_CPU_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_dir():
    from finetune.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)
