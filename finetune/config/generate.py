"""Generate group: decoding settings for `finetune generate` (and what to generate with)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

CONSTRAINTS = ("none", "json_schema")


@dataclass
class GenerateConfig:
    prompts: Optional[str] = field(default=None, metadata={
        "help": "jsonl of {messages: [...]} or {prompt: '...'} rows (optional schema, other fields copied to the "
                "output); default the run's val split."})
    output: Optional[str] = field(default=None, metadata={"help": "Results jsonl; default <run>/generations.jsonl."})
    model: Optional[str] = field(default=None, metadata={
        "help": "A merged model folder to use instead of <run>/merged (no run= needed)."})
    dtype: str = field(default="auto", metadata={
        "help": "Compute dtype of the merged model while generating: auto = quant.compute_dtype (bf16 on CUDA; on a CPU "
                "what its features and a measurement choose, finetune/models/cpu.py). "
                "bfloat16 decoded 2x faster than fp32 on this project's AVX512-BF16 CPU (benchmarks/generate.py)."})
    use_adapter: bool = field(default=False, metadata={
        "help": "Generate with the unmerged adapter on its base as trained (4-bit for QLoRA) instead."})
    interactive: bool = field(default=False, metadata={"help": "Chat on the terminal instead of a prompts file."})
    system: Optional[str] = field(default=None, metadata={"help": "System message for rows that have none."})
    max_new_tokens: int = field(default=256, metadata={"help": "Up to 8192."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per batch (length-sorted, left-padded)."})
    do_sample: bool = field(default=False, metadata={"help": "false = greedy; true = sample with the settings below."})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    constrain: str = field(default="none", metadata={
        "help": "none | json_schema (each output follows its row's schema: row field 'schema' or generate.schema)."})
    schema: Optional[str] = field(default=None, metadata={
        "help": "A JSON Schema file for rows without their own 'schema'."})

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.max_new_tokens <= 8192:
            out.append(f"generate.max_new_tokens={self.max_new_tokens}: must be in 1..8192")
        if self.batch_size <= 0:
            out.append(f"generate.batch_size={self.batch_size}: must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"generate.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.constrain not in CONSTRAINTS:
            out.append(f"generate.constrain={self.constrain!r}: use none or json_schema")
        if self.temperature <= 0:
            out.append(f"generate.temperature={self.temperature}: must be positive (for greedy set do_sample=false)")
        if not 0 < self.top_p <= 1:
            out.append(f"generate.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            out.append(f"generate.top_k={self.top_k}: use 0 (off) or a positive number")
        if self.interactive and self.constrain != "none":
            out.append("generate.interactive=true with generate.constrain: constrained decoding needs a schema "
                       "per row; use a prompts file")
        return out
