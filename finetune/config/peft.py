"""PEFT group: the LoRA adapter that is trained."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

# Initialisations of the LoRA weights that peft offers and this project wires up. Where each applies:
# true/false/gaussian on any base; pissa (SVD of the base weight) needs an unquantized base and changes
# it, so the saved adapter is converted back to a plain LoRA of rank 2r; loftq (SVD of the quantization
# error) needs a 4-bit base and a CUDA GPU (peft computes it there). The cross-group rules are in
# finetune/config/__init__.py.
INIT_NAMES = ("true", "false", "gaussian", "pissa", "loftq")
_PISSA_FAST = re.compile(r"^pissa_niter_[1-9][0-9]*$")  # randomized SVD with N subspace iterations


def init_name(value: Any) -> str:
    """peft.init_lora_weights as a lower-case string ('true', 'gaussian', 'pissa_niter_4', ...)."""
    return str(value).lower()


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
        default=True, metadata={"help": "true (default), false, gaussian, pissa, pissa_niter_<n>, loftq."}
    )
    bias: str = field(default="none", metadata={"help": "none | all | lora_only"})

    @property
    def init(self) -> str:
        return init_name(self.init_lora_weights)

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
        names_ok = isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm)
        if not (tm == "all-linear" or names_ok):
            out.append(f"peft.target_modules={tm!r}: use 'all-linear' or a non-empty list of module names")
        elif isinstance(tm, (list, tuple)) and "lm_head" in tm:
            # trl computes the loss from lm_head.weight directly, so a LoRA on lm_head would never train.
            out.append("peft.target_modules contains lm_head: trl computes the loss from lm_head.weight directly, so "
                       "a LoRA there never trains; train the head in full with peft.modules_to_save=[lm_head]")
        mts = self.modules_to_save
        if mts is not None and not all(isinstance(m, str) and m for m in mts):
            out.append(f"peft.modules_to_save={mts!r}: use a list of module names such as [embed_tokens, lm_head]")
        if self.init not in INIT_NAMES and not _PISSA_FAST.match(self.init):
            out.append(f"peft.init_lora_weights={self.init_lora_weights!r}: use one of {', '.join(INIT_NAMES)} "
                       "or pissa_niter_<n>")
        if self.use_dora and self.init.startswith("pissa"):
            # peft converts a PiSSA adapter back to a plain LoRA (so it merges into the original base) from
            # lora_A/lora_B alone; DoRA's magnitude vector has no such conversion.
            out.append(f"peft.use_dora=true with peft.init_lora_weights={self.init}: peft's PiSSA-to-LoRA "
                       "conversion (needed to merge into the original base) does not cover DoRA; use one of them")
        if self.use_dora and self.init == "loftq":
            # DoRA's magnitude is computed from the base weight before LoftQ replaces lora_A/lora_B, so it
            # would start out of step with the weight it scales.
            out.append("peft.use_dora=true with peft.init_lora_weights=loftq: DoRA's magnitude is set before "
                       "LoftQ rewrites lora_A/lora_B; use one of them")
        return out
