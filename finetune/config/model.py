"""Model group: which base model to load and how to talk to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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
    context_length: Optional[int] = field(default=None, metadata={
        "help": "Longest sequence the model supports; null = the model's own config.json (max_position_embeddings)."})
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "Jinja chat template (text or a .jinja path) replacing the tokenizer's."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | sdpa_packed (per document on packed rows) | flash_attention_2 | flex_attention"})
    architecture: Optional[Dict[str, Any]] = field(
        default=None,
        metadata={"help": "Architecture numbers (hidden_size, num_hidden_layers, ...) for the memory plan when the "
                          "model's config.json cannot be read (a Hub model offline). The model's own config wins."},
    )
    architecture_of: Optional[str] = field(
        default=None,
        metadata={"help": "The name_or_path the architecture numbers describe (set by model presets). When "
                          "name_or_path differs, the preset's numbers are ignored; null = numbers you set yourself."},
    )

    @property
    def is_embedded(self) -> bool:
        return self.name_or_path.startswith(EMBEDDED_PREFIX)

    def problems(self) -> list[str]:
        out = []
        if self.context_length is not None and self.context_length <= 0:
            out.append(f"model.context_length={self.context_length}: must be a positive number of tokens")
        if self.attn_implementation not in ("eager", "sdpa", "sdpa_packed", "flash_attention_2", "flex_attention"):
            out.append(
                f"model.attn_implementation={self.attn_implementation!r}: use eager, sdpa, sdpa_packed, "
                "flash_attention_2 or flex_attention"
            )
        # A Hub id is "org/name"; anything that starts like a path or has more slashes is a local folder, and a
        # missing one used to reach the Hub client, whose answer was "Repo id must be in the form ...".
        name = self.name_or_path
        if not self.is_embedded and not self.gguf_file and _looks_local(name) and not Path(name).expanduser().is_dir():
            out.append(f"model.name_or_path={name!r}: no such folder; give an existing model folder (with "
                       "config.json) or a Hub id such as Qwen/Qwen2.5-3B-Instruct")
        # A template is Jinja text ({% ... %} / {{ ... }}); a value without either is meant as a file, and a mistyped
        # path used to become the template text itself, blamed on data row 1.
        tpl = self.chat_template
        if tpl is not None and "{%" not in tpl and "{{" not in tpl and not Path(tpl).expanduser().is_file():
            out.append(f"model.chat_template={tpl!r}: no such file, and not Jinja template text; give the path of "
                       "an existing .jinja file or the template itself")
        if self.is_embedded and self.name_or_path not in EMBEDDED_MODELS:
            out.append(f"model.name_or_path={self.name_or_path!r}: the embedded models are "
                       + " and ".join(repr(m) for m in EMBEDDED_MODELS))
        return out


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or name in (".", "..")
