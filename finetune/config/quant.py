"""Quantization group: how the frozen base weights are stored while the adapter trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

QUANT_METHODS = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


@dataclass
class QuantConfig:
    method: str = field(default="nf4", metadata={"help": "nf4 | fp4 (4-bit), int8 (8-bit), none (16-bit/fp32)."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too (saves ~0.4 bit/param)."})
    compute_dtype: str = field(
        default="auto",
        metadata={"help": "auto = bfloat16 on CUDA; on CPU bfloat16 only where the CPU has native bf16 (AMX-BF16, "
                          "AVX512-BF16) and a measured bf16 matmul beats fp32 by 1.5x, else float32 (emulated bf16 "
                          "ran 2.75-7x slower); the choice and its figures are logged. FINETUNE_CPU_DTYPE=float32|"
                          "bfloat16 overrides auto on CPU."}
    )
    fp32_norms: bool = field(
        default=False,
        metadata={"help": "true = peft's prepare_model_for_kbit_training layout on a quantized base: norms and "
                          "biases cast to fp32, so the residual stream between layers is fp32 too. false (default) "
                          "keeps them in the compute dtype, as 16-bit LoRA does: with bf16 compute, one step of "
                          "2,048 tokens on the Qwen2.5-0.5B shape peaked at 5,572 MB instead of 6,941 (16-bit LoRA: "
                          "6,077) with the same loss (12.1262 vs 12.1261). With fp32 compute both are fp32."},
    )
    storage_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Tensor dtype the packed 4-bit weights are stored in; null = bitsandbytes' uint8. FSDP "
                          "needs the compute dtype (bfloat16) here to shard them with the other parameters."},
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
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            out.append(f"quant.storage_dtype={self.storage_dtype!r}: use null or one of {', '.join(STORAGE_DTYPES)}")
        if self.storage_dtype is not None and not self.is_4bit:
            out.append(f"quant.storage_dtype applies to 4-bit quantization only (quant.method={self.method!r})")
        return out
