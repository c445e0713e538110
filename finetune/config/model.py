"""Model group: which base model to load and how to talk to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("embedded:tiny", "embedded:smollm2-135m-instruct")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="embedded:tiny",
        metadata={"help": "Hub id, local folder, or an embedded offline model: 'embedded:tiny' (random, for "
                          "tests) or 'embedded:smollm2-135m-instruct' (real, from PyPI)."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    gguf_file: Optional[str] = field(
        default=None,
        metadata={"help": "Local .gguf file to use instead of name_or_path: converted once (dequantized) into a "
                          "plain cached model folder."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model repo to run. Off unless you set it."}
    )
    context_length: int = field(default=32768, metadata={"help": "Longest sequence the model supports."})
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "Jinja chat template (text or a .jinja path) replacing the tokenizer's."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})
    architecture: Optional[Dict[str, Any]] = field(
        default=None,
        metadata={"help": "Architecture numbers (hidden_size, num_hidden_layers, ...) for offline planning."},
    )

    @property
    def is_embedded(self) -> bool:
        return self.name_or_path.startswith(EMBEDDED_PREFIX)

    def problems(self) -> list[str]:
        out = []
        if self.context_length <= 0:
            out.append(f"model.context_length={self.context_length}: must be a positive number of tokens")
        if self.attn_implementation not in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
            out.append(
                f"model.attn_implementation={self.attn_implementation!r}: use eager, sdpa, "
                "flash_attention_2 or flex_attention"
            )
        if self.is_embedded and self.name_or_path not in EMBEDDED_MODELS:
            out.append(f"model.name_or_path={self.name_or_path!r}: the embedded models are "
                       + " and ".join(repr(m) for m in EMBEDDED_MODELS))
        return out
