"""Export group: other formats of the merged model (GGUF for llama.cpp / Ollama)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ExportConfig:
    format: str = field(default="gguf", metadata={"help": "gguf"})
    quant: str = field(default="f16", metadata={"help": "GGUF tensor type: f32 | f16 | bf16 | q8_0"})
    output: Optional[str] = field(default=None, metadata={"help": "Output folder; default <run>/export."})
    overwrite: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.format != "gguf":
            out.append(f"export.format={self.format!r}: the supported format is gguf")
        return out
