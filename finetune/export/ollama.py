"""An Ollama Modelfile for an exported GGUF file: FROM, TEMPLATE (the chat template), stop tokens, sampling.

Ollama templates are Go text/template, not Jinja, so the model's Jinja chat template cannot be copied.
Instead it is measured: conversations with marker contents are rendered by transformers, and the text
around each marker gives, per role, what comes before and after a message's content, plus what starts a
conversation without a system message (Qwen2.5 inserts a default system turn there) and the generation
prompt. The parts are accepted only if they rebuild transformers' rendering of several conversations
exactly; otherwise the Modelfile carries no TEMPLATE and says why (a template whose output depends on
more than the role and content of each message, e.g. tool calls or turn counters, cannot be expressed
this way).

A default system prompt (the turn Qwen2.5 and SmolLM2 insert when a chat has none) also becomes the Modelfile's
SYSTEM: Ollama then sends it as the first message, which renders to the same text, `ollama show --system` shows it,
and a system message of the user's replaces it, as in the Jinja template.

Literal text goes into the Go template as quoted strings ({{ "..." }}), so the whitespace trimming of
{{- ... }} never eats a newline that belongs to the template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROLES = ("system", "user", "assistant")


@dataclass
class TemplateParts:
    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    no_system_start: str  # text before the first message when it is not a system message
    generation: str  # the generation prompt (added after a final user message)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """What the Go template below renders for `messages` (used to check the parts against Jinja)."""
        out = "" if messages and messages[0]["role"] == "system" else self.no_system_start
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return out + (self.generation if add_generation_prompt else "")

    @property
    def default_system(self) -> Optional[str]:
        """The system prompt the template inserts when a chat has none, if that start is exactly a system turn."""
        before, after = self.prefix["system"], self.suffix["system"]
        start = self.no_system_start
        if len(start) > len(before) + len(after) and start.startswith(before) and start.endswith(after):
            return start[len(before): len(start) - len(after)]
        return None


def _marker(i: int) -> str:
    return f"Zq{i}xMARKx{i}qZ"  # plain letters: survives templates that trim or escape contents


def template_parts(tokenizer) -> tuple[Optional[TemplateParts], str]:
    """The chat template as per-role parts, or (None, reason) when it cannot be expressed that way."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer has no chat template"

    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    roles = ["system", "user", "assistant", "user", "assistant"]
    conv = [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)]
    try:
        texts = [render(conv[:k]) for k in range(len(conv) + 1)]
        generation = render(conv[:2], True)[len(texts[2]):]
        alone = render([{"role": "user", "content": _marker(9)}])
    except Exception as e:  # a template that raises on one of these conversations (Jinja errors, exceptions)
        return None, f"the chat template refused a probe conversation ({type(e).__name__}: {e})"
    prefix: dict[str, str] = {}
    suffix: dict[str, str] = {}
    for k, m in enumerate(conv):
        if not texts[k + 1].startswith(texts[k]):
            return None, "rendering is not message by message (adding a turn changes the text of earlier turns)"
        if texts[k + 1].count(m["content"]) != 1:
            return None, f"a {m['role']} message's content is not written once, where its turn is added"
        block = texts[k + 1][len(texts[k]):]
        before, after = block.split(m["content"])
        if prefix.setdefault(m["role"], before) != before or suffix.setdefault(m["role"], after) != after:
            return None, f"{m['role']} turns are not rendered alike at every position"
    user_block = prefix["user"] + _marker(9) + suffix["user"]
    if not alone.endswith(user_block):
        return None, "a conversation without a system message does not end with a plain user turn"
    parts = TemplateParts(prefix, suffix, alone[: -len(user_block)], generation)
    checks = [
        ([{"role": "user", "content": "Hello there."}], True),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
        ([{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
          {"role": "user", "content": "C?"}], True),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "A?"},
          {"role": "assistant", "content": "B."}], False),
    ]
    for msgs, gen in checks:
        if parts.render(msgs, gen) != render(msgs, gen):
            return None, f"the derived parts do not reproduce the template for roles {[m['role'] for m in msgs]}"
    return parts, ""


def _lit(text: str) -> str:
    """A Go template action printing `text` (JSON string escapes are valid Go string escapes)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(parts: TemplateParts) -> str:
    """The Ollama (Go text/template) form of `parts`, over .Messages."""
    lines = []
    if parts.no_system_start:
        lines.append('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     + _lit(parts.no_system_start) + "{{ end }}")
    lines.append("{{- range $i, $_ := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    for k, role in enumerate(ROLES):
        keyword = "if" if k == 0 else "else if"
        # A final assistant message is left open (no suffix): Ollama continues it.
        tail = ("{{ if not $last }}" + _lit(parts.suffix[role]) + "{{ end }}"
                if role == "assistant" and parts.suffix[role] else _lit(parts.suffix[role]))
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}' + _lit(parts.prefix[role]) + "{{ .Content }}" + tail)
    lines.append("{{- end }}")
    lines.append('{{- if and $last (ne .Role "assistant") }}' + _lit(parts.generation) + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


def _sampling(generation_config: Any) -> list[str]:
    """PARAMETER lines from generation_config.json: greedy (do_sample false) is temperature 0 in Ollama."""
    if generation_config is None:
        return []
    if not getattr(generation_config, "do_sample", False):
        return ["PARAMETER temperature 0"]
    out = []
    for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("repetition_penalty", "repeat_penalty")):
        value = getattr(generation_config, key, None)
        if value is not None:
            out.append(f"PARAMETER {name} {value}")
    return out


def write_modelfile(folder: Path, gguf_name: str, tokenizer, stops: list[int], generation_config: Any,
                    model_name: str) -> dict:
    """Write <folder>/Modelfile next to the GGUF file; returns what went into it (for export.json)."""
    parts, reason = template_parts(tokenizer)
    stop_texts = [tokenizer.convert_ids_to_tokens(i) for i in stops]
    lines = [f"# Ollama: ollama create {model_name} -f Modelfile   (run from this folder)",
             f"FROM ./{gguf_name}"]
    system = parts.default_system if parts is not None else None
    if system is not None and '"""' in system:  # cannot be quoted in a Modelfile; the TEMPLATE still has it
        system = None
    if parts is not None:
        lines.append('TEMPLATE """' + go_template(parts) + '"""')
        if system is not None:
            lines.append('SYSTEM """' + system + '"""')
    else:
        lines.append(f"# No TEMPLATE: {reason}. Ollama falls back to its own detection from the chat template "
                     "stored in the GGUF file (tokenizer.chat_template).")
    lines += [f"PARAMETER stop {json.dumps(t, ensure_ascii=False)}" for t in stop_texts]
    lines += _sampling(generation_config)
    (Path(folder) / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"template": parts is not None, "template_note": reason or None, "system": system, "stop": stop_texts}
