"""Format adapters: every supported row shape becomes one conversation form.

alpaca     {instruction, input?, output, system?}
sharegpt   {conversations: [{from: human|gpt|system, value}]}
messages   {messages: [{role: system|user|assistant, content}]}   (OpenAI)
completion {prompt, completion}
structured {input, output, schema?}                               (see structured.py)

`columns` ({ours: theirs}) renames fields first, including the keys inside messages.
completion rows are rendered through the chat template too (one user turn, one reply).
Message contents are stripped of surrounding whitespace: a reply starting with a newline would
merge with the template's header newline into one token, and the prompt seen at inference would no
longer be a token prefix of the training row.
Problems raise RowError with a reason key (counted in stats.json) and a message for people.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from finetune.data.sources import RowError
from finetune.config.data import SourceConfig, StructuredConfig

ROLES = ("system", "user", "assistant")
# ShareGPT exports use several spellings for the same three roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


@dataclass
class Example:
    """One conversation ready to render. `schema` is a JSON string ("" for chat rows)."""

    messages: list[dict[str, str]]
    task: str = "chat"
    schema: str = ""
    origin: str = ""
    source: int = 0

    @property
    def target(self) -> str:
        return self.messages[-1]["content"]


def field_of(row: dict, name: str, columns: dict[str, str], *, required: bool = True) -> Any:
    """Row field `name` after renaming; a missing required field says which fields the row has."""
    key = columns.get(name, name)
    if key not in row or row[key] is None:
        if not required:
            return None
        have = ", ".join(map(str, row)) or "none"
        hint = f" (renamed from {name!r} by columns)" if key != name else ""
        raise RowError("missing_field", f"field {key!r}{hint} is missing; the row has: {have}. Rename a field "
                                        f"with data.sources[].columns={{{name}: <your field>}}")
    return row[key]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError("bad_type", f"{where} must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value.strip()


def _parse_messages(value: Any, where: str) -> list:
    if isinstance(value, str):  # parquet/csv exports often store the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("bad_type", f"field {where!r} is a string but not a JSON list of messages") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError("bad_type", f"field {where!r} must be a list of message objects")
    return value


def check_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Shared rules: known roles, system only first, a user turn first, non-empty replies, ends with a reply."""
    if not messages:
        raise RowError("empty_conversation", "conversation has no messages")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise RowError("unknown_role", f"messages[{i}].role={m['role']!r} is not one of system, user, "
                                           "assistant; map it with columns or fix the data")
        if m["role"] == "system" and i != 0:
            raise RowError("bad_order", f"messages[{i}] is a system message; only the first message may be one")
        if m["role"] == "assistant" and not m["content"]:
            raise RowError("empty_reply", f"messages[{i}] is an empty assistant reply; nothing to learn from it")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise RowError("bad_order", "conversation must start with a user message (after an optional system one)")
    if messages[-1]["role"] != "assistant":
        raise RowError("no_reply", "conversation must end with an assistant reply (the training target)")
    return messages


def _from_message_list(value: Any, where: str, role_key: str, content_key: str,
                       role_map: dict[str, str] | None) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(_parse_messages(value, where)):
        if role_key not in m or content_key not in m:
            have = ", ".join(m) or "none"
            raise RowError("missing_field", f"{where}[{i}] needs keys {role_key!r} and {content_key!r}; it has: "
                                            f"{have}. Rename with data.sources[].columns")
        role = m[role_key]
        if role_map is not None:
            if role not in role_map:
                raise RowError("unknown_role", f"{where}[{i}].{role_key}={role!r} is not one of "
                                               f"{', '.join(sorted(role_map))}")
            role = role_map[role]
        out.append({"role": role, "content": _text(m[content_key], f"{where}[{i}].{content_key}")})
    return check_conversation(out)


def adapt_messages(row: dict, cols: dict[str, str]) -> Example:
    msgs = field_of(row, "messages", cols)
    return Example(_from_message_list(msgs, cols.get("messages", "messages"), cols.get("role", "role"),
                                      cols.get("content", "content"), None))


def adapt_sharegpt(row: dict, cols: dict[str, str]) -> Example:
    conv = field_of(row, "conversations", cols)
    return Example(_from_message_list(conv, cols.get("conversations", "conversations"), cols.get("from", "from"),
                                      cols.get("value", "value"), SHAREGPT_ROLES))


def adapt_alpaca(row: dict, cols: dict[str, str]) -> Example:
    instruction = _text(field_of(row, "instruction", cols), "instruction")
    extra = field_of(row, "input", cols, required=False)
    user = instruction + ("\n\n" + _text(extra, "input") if extra and str(extra).strip() else "")
    msgs = [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(field_of(row, "output", cols), "output")}]
    system = field_of(row, "system", cols, required=False)
    if system and str(system).strip():
        msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    return Example(check_conversation(msgs))


def adapt_completion(row: dict, cols: dict[str, str]) -> Example:
    msgs = [{"role": "user", "content": _text(field_of(row, "prompt", cols), "prompt")},
            {"role": "assistant", "content": _text(field_of(row, "completion", cols), "completion")}]
    return Example(check_conversation(msgs))


CHAT_ADAPTERS: dict[str, Callable[[dict, dict[str, str]], Example]] = {
    "messages": adapt_messages, "sharegpt": adapt_sharegpt, "alpaca": adapt_alpaca, "completion": adapt_completion,
}
