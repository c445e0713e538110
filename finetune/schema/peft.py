"""PEFT group: the LoRA adapter that is trained."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class PeftConfig:
    method: str = field(default="lora", metadata={"help": "Adapter type; 'lora' (DoRA/rsLoRA are LoRA options)."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: Any = field(
        default="all-linear", metadata={"help": "'all-linear' or a list of module names (q_proj, v_proj, ...)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    modules_to_save: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (embed_tokens, lm_head)."}
    )
    init_lora_weights: Any = field(
        default=True, metadata={"help": "true (default), gaussian, pissa, loftq — where peft supports them."}
    )
    bias: str = field(default="none", metadata={"help": "none | all | lora_only"})

    def problems(self) -> list[str]:
        out = []
        if self.method != "lora":
            out.append(f"peft.method={self.method!r}: only 'lora' is supported (use_dora/use_rslora for variants)")
        if self.r <= 0:
            out.append(f"peft.r={self.r}: the LoRA rank must be a positive integer (try 16)")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"peft.lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.lora_alpha <= 0:
            out.append(f"peft.lora_alpha={self.lora_alpha}: must be positive (try 2 * r)")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"peft.bias={self.bias!r}: use none, all or lora_only")
        tm = self.target_modules
        if not (tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) for t in tm))):
            out.append(f"peft.target_modules={tm!r}: use 'all-linear' or a non-empty list of module names")
        return out
