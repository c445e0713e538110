"""Eval group: post-training checks, and the gates that fail a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

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
