"""Groups for the stages after training: merge, generate, eval."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional


@dataclass
class MergeConfig:
    enabled: bool = field(default=True, metadata={"help": "Merge at the end of `finetune train`."})
    base: str = field(default="original", metadata={"help": "original (16-bit/fp32 reload) | nf4_roundtrip"})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU."})
    output: Optional[str] = field(default=None, metadata={"help": "Output folder; default <run>/merged."})
    overwrite: bool = False
    parity_prompts: int = field(default=8, metadata={"help": "Held-out prompts compared in parity.json."})
    parity_threshold: float = field(default=0.99, metadata={"help": "Warn when greedy agreement falls below."})

    def problems(self) -> list[str]:
        out = []
        if self.base not in ("original", "nf4_roundtrip"):
            out.append(f"merge.base={self.base!r}: use original or nf4_roundtrip")
        if not 0 <= self.parity_threshold <= 1:
            out.append(f"merge.parity_threshold={self.parity_threshold}: must be in [0, 1]")
        return out


@dataclass
class GenerateConfig:
    prompts: Optional[str] = field(default=None, metadata={"help": "jsonl of {messages} or {prompt}; default val split."})
    output: Optional[str] = field(default=None, metadata={"help": "Where to write generations (jsonl)."})
    use_adapter: bool = field(default=False, metadata={"help": "Generate with the unmerged adapter."})
    interactive: bool = False
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    constrain: str = field(default="none", metadata={"help": "none | json_schema"})

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.max_new_tokens <= 8192:
            out.append(f"generate.max_new_tokens={self.max_new_tokens}: must be in 1..8192")
        if self.batch_size <= 0:
            out.append(f"generate.batch_size={self.batch_size}: must be positive")
        if self.constrain not in ("none", "json_schema"):
            out.append(f"generate.constrain={self.constrain!r}: use none or json_schema")
        return out


@dataclass
class EvalGates:
    """Minimum value per metric; null = no gate. A typo in a metric name fails at compose time."""
    exact_match: Optional[float] = None
    normalized_match: Optional[float] = None
    json_valid_rate: Optional[float] = None
    schema_valid_rate: Optional[float] = None
    field_f1: Optional[float] = None
    rouge_l: Optional[float] = None
    stopped_rate: Optional[float] = None

    def active(self) -> Dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class EvalConfig:
    enabled: bool = field(default=True, metadata={"help": "Evaluate at the end of `finetune train`."})
    max_samples: Optional[int] = None
    max_new_tokens: int = 256
    batch_size: int = 16
    constrain: str = "none"
    compare_base: bool = field(default=True, metadata={"help": "Also score the base model without the adapter."})
    gates: EvalGates = field(
        default_factory=EvalGates, metadata={"help": "metric -> minimum, e.g. eval.gates.exact_match=0.9; a miss exits non-zero."}
    )

    def problems(self) -> list[str]:
        out = []
        if self.constrain not in ("none", "json_schema"):
            out.append(f"eval.constrain={self.constrain!r}: use none or json_schema")
        if self.max_new_tokens <= 0:
            out.append(f"eval.max_new_tokens={self.max_new_tokens}: must be positive")
        return out
