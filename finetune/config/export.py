"""Export group: other formats of the merged model (GGUF for llama.cpp / Ollama)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Tensor types the `gguf` package writes in pure Python (gguf.quants).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# K-quants (Ollama's usual q4_k_m) come from llama.cpp's own C++ quantizer, which the `gguf` package does not
# have: they need llama-cpp-python (the `llamacpp` extra), which runs it on an f16 file written first.
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
VERIFY_READERS = ("auto", "llama_cpp", "transformers", "none")


@dataclass
class ExportConfig:
    format: str = field(default="gguf", metadata={"help": "gguf"})
    quant: str = field(default="f16", metadata={
        "help": "GGUF tensor type of the weight matrices: " + " | ".join(GGUF_QUANTS) + " (Python), or with "
                "llama-cpp-python installed " + " | ".join(K_QUANTS) + " (llama.cpp's quantizer). Norms and biases "
                "stay f32 (llama.cpp expects that); a matrix whose rows do not split into blocks stays f16."})
    output: Optional[str] = field(default=None, metadata={"help": "Output folder; default <run>/export/gguf-<quant>."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    model: Optional[str] = field(default=None, metadata={
        "help": "Merged model folder to export (transformers format); default <run>/merged."})
    name: Optional[str] = field(default=None, metadata={
        "help": "Model name in the GGUF metadata and the file name; default the run's name."})
    modelfile: bool = field(default=True, metadata={
        "help": "Write an Ollama Modelfile (chat template + stop tokens) next to the GGUF file."})
    verify: str = field(default="auto", metadata={
        "help": "Reload the file and compare greedy output with the merged model: llama_cpp (llama-cpp-python), "
                "transformers (its GGUF loader), auto (llama_cpp when installed, else transformers), none."})
    verify_prompts: int = field(default=4, metadata={"help": "Held-out prompts compared by the verification."})
    verify_max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens generated per prompt."})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "jsonl of {messages} or {prompt} rows for the verification; default the run's val split."})

    def problems(self) -> list[str]:
        out = []
        if self.format != "gguf":
            out.append(f"export.format={self.format!r}: the supported format is gguf")
        if self.quant not in GGUF_QUANTS + K_QUANTS:
            out.append(f"export.quant={self.quant!r}: use one of {', '.join(GGUF_QUANTS)}, or with llama-cpp-python "
                       f"installed {', '.join(K_QUANTS)}")
        if self.verify not in VERIFY_READERS:
            out.append(f"export.verify={self.verify!r}: use one of {', '.join(VERIFY_READERS)}")
        if self.verify_prompts < 0:
            out.append(f"export.verify_prompts={self.verify_prompts}: use 0 (no comparison) or more")
        if self.verify_max_new_tokens <= 0:
            out.append(f"export.verify_max_new_tokens={self.verify_max_new_tokens}: must be positive")
        if self.name is not None and (not self.name.strip() or "/" in self.name or "\\" in self.name):
            out.append(f"export.name={self.name!r}: give a plain file-name stem (no slashes)")
        return out
