"""Model group: which base model to load and how to talk to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

EMBEDDED_PREFIX = "embedded:"


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="embedded:tiny",
        metadata={"help": "Hub id, local folder, or 'embedded:tiny' for the offline test model."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
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
        if self.is_embedded and self.name_or_path != "embedded:tiny":
            out.append(f"model.name_or_path={self.name_or_path!r}: the only embedded model is 'embedded:tiny'")
        return out
