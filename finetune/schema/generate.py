"""Generate group: decoding settings for `finetune generate`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
