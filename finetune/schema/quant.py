"""Quantization group: how the frozen base weights are stored while the adapter trains."""
from __future__ import annotations

from dataclasses import dataclass, field

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QuantConfig:
    method: str = field(default="nf4", metadata={"help": "nf4 | fp4 (4-bit), int8 (8-bit), none (16-bit/fp32)."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too (saves ~0.4 bit/param)."})
    compute_dtype: str = field(
        default="auto", metadata={"help": "auto = bfloat16 on CUDA, float32 on CPU (bf16 is 2-3x slower on CPU)."}
    )

    @property
    def is_4bit(self) -> bool:
        return self.method in ("nf4", "fp4")

    @property
    def is_quantized(self) -> bool:
        return self.method != "none"

    def problems(self) -> list[str]:
        out = []
        if self.method not in QUANT_METHODS:
            out.append(f"quant.method={self.method!r}: use one of {', '.join(QUANT_METHODS)}")
        if self.compute_dtype not in DTYPES:
            out.append(f"quant.compute_dtype={self.compute_dtype!r}: use one of {', '.join(DTYPES)}")
        return out
