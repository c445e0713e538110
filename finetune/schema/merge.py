"""Merge group: how the adapter is merged into its base."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
