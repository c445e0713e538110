"""Format adapters: every supported row shape becomes one conversation form.

alpaca     {instruction, input?, output, system?, history?: [[user, reply], ...]}   (LLaMA-Factory layout too)
sharegpt   {conversations: [{from, value}], system?, tools?}   from: human | gpt | system | function_call |
           observation (+ common spellings)
messages   {messages: [{role, content, name?, tool_calls?, tool_call_id?, weight?, reasoning_content?}],
           tools?}   (OpenAI chat fine-tuning files; legacy `functions` / `function_call` too)
completion {prompt, completion}
structured {input, output, schema?}                                                   (see structured.py)

The one form: messages with role system | user | assistant | tool, `content` a string ("" for a pure
tool-call turn), plus `tool_calls` (tools.py form), `reasoning_content`, `name`, `tool_call_id` and
`weight` (0 = do not train this reply) where the row has them; tools travel beside the messages.
Content given as a list of parts is joined (text parts, one newline between them: they are paragraphs
of one message); an image or audio part refuses the row, as we train text models.

`columns` ({ours: theirs}) renames fields first, including the keys inside messages. Fields a format
does not use are not an error, but never silent either: each Example lists them in `ignored` and the
build counts them per field in stats.json and names them in one warning.
Message contents are stripped of surrounding whitespace: a reply starting with a newline would
merge with the template's header newline into one token, and the prompt seen at inference would no
longer be a token prefix of the training row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from finetune.data.sources import RowError
from finetune.data.tools import normalize_tool_calls, normalize_tools

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}
# ShareGPT exports use several spellings for the same roles; LLaMA-Factory adds the tool ones.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "weight", "reasoning_content",
                "function_call"}
TEXT_PARTS = ("text", "input_text", "output_text")
MEDIA_PARTS = ("image_url", "image", "input_image", "audio", "input_audio", "file", "video", "video_url")


@dataclass
class Example:
    """One conversation ready to render. `schema` is a JSON string ("" for chat rows)."""

    messages: list[dict]
    task: str = "chat"
    schema: str = ""
    origin: str = ""
    source: int = 0
    tools: list[dict] | None = None
    ignored: list[str] = field(default_factory=list)  # fields of the row this format does not use
    target_text: str | None = None  # what the last reply renders to, when that is not its content (tool calls)

    @property
    def target(self) -> str:
        return self.messages[-1]["content"]

    def features(self) -> set[str]:
        """What the chat template must be able to render for this row (tools, tool calls, ...)."""
        out = {"tools"} if self.tools else set()
        for m in self.messages:
            if m.get("tool_calls"):
                out.add("tool_calls")
            if m["role"] == "tool":
                out.add("tool_results")
            if m.get("reasoning_content"):
                out.add("reasoning")
            if m.get("name") and m["role"] != "tool":
                out.add("names")
        return out


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


def unused_fields(row: dict, used: tuple[str, ...], columns: dict[str, str]) -> list[str]:
    """Top-level fields of `row` that the format does not read (after renaming)."""
    keys = {columns.get(u, u) for u in used}
    return [str(k) for k in row if k not in keys]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RowError("bad_type", f"{where} must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value.strip()


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if value is None:
        return ""
    if not isinstance(value, list):
        return _text(value, where)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            texts.append(_text(part.get("text"), f"{where}[{j}].text"))
        elif kind in MEDIA_PARTS:
            raise RowError("non_text_content", f"{where}[{j}] is an {kind!r} part; this framework trains text "
                                               "models, so remove the part (or the row)")
        elif isinstance(part, str):
            texts.append(part.strip())
        else:
            raise RowError("bad_content", f"{where}[{j}] is not a text part {{type: text, text: ...}}: "
                                          f"{str(part)[:60]!r}")
    return "\n".join(t for t in texts if t)


def _parse_messages(value: Any, where: str) -> list:
    if isinstance(value, str):  # parquet/csv exports often store the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("bad_type", f"field {where!r} is a string but not a JSON list of messages") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError("bad_type", f"field {where!r} must be a list of message objects")
    return value


def _weight(value: Any, where: str, role: str) -> int | None:
    if value is None:
        return None
    if role != "assistant":
        raise RowError("bad_weight", f"{where}.weight is set on a {role} message; only assistant replies have one")
    if isinstance(value, bool) or value not in (0, 1):
        raise RowError("bad_weight", f"{where}.weight={value!r}: use 0 (do not train this reply) or 1")
    return int(value)


def _add(out: list[dict], msg: dict) -> None:
    # ShareGPT tool data writes a reply's text and its call as two turns (gpt, function_call): one turn here.
    prev = out[-1] if out else None
    if (prev is not None and prev["role"] == msg["role"] == "assistant" and msg.get("tool_calls")
            and not prev.get("tool_calls") and not msg["content"]):
        prev["tool_calls"] = msg["tool_calls"]
        return
    out.append(msg)


def check_conversation(messages: list[dict]) -> list[dict]:
    """Shared rules: known roles, system only first, a user turn first, tool results after a call,
    non-empty replies, ends with a reply, something to train."""
    if not messages:
        raise RowError("empty_conversation", "conversation has no messages")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise RowError("unknown_role", f"messages[{i}].role={m['role']!r} is not one of system, user, "
                                           "assistant, tool; map it with columns or fix the data")
        if m["role"] == "system" and i != 0:
            raise RowError("bad_order", f"messages[{i}] is a system message; only the first message may be one")
        if m["role"] == "assistant" and not m["content"] and not m.get("tool_calls"):
            raise RowError("empty_reply", f"messages[{i}] is an empty assistant reply; nothing to learn from it")
        if m["role"] == "tool":
            prev = messages[i - 1] if i else {"role": ""}
            if not (prev["role"] == "tool" or (prev["role"] == "assistant" and prev.get("tool_calls"))):
                raise RowError("bad_order", f"messages[{i}] is a tool result that follows no tool call")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise RowError("bad_order", "conversation must start with a user message (after an optional system one)")
    if messages[-1]["role"] != "assistant":
        raise RowError("no_reply", "conversation must end with an assistant reply (the training target)")
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RowError("nothing_to_train", "every assistant reply has weight 0; nothing to learn from the row")
    return messages


def _from_message_list(value: Any, where: str, keys: dict[str, str], role_map: dict[str, str],
                       tools: list[dict] | None, ignored: list[str]) -> list[dict]:
    role_key, content_key = keys["role"], keys["content"]
    out: list[dict] = []
    for i, m in enumerate(_parse_messages(value, where)):
        at = f"{where}[{i}]"
        if role_key not in m or (content_key not in m and not ({"tool_calls", "function_call"} & set(m))):
            have = ", ".join(m) or "none"
            raise RowError("missing_field", f"{at} needs keys {role_key!r} and {content_key!r}; it has: "
                                            f"{have}. Rename with data.sources[].columns")
        raw_role = m[role_key]
        if raw_role not in role_map:
            raise RowError("unknown_role", f"{at}.{role_key}={raw_role!r} is not one of "
                                           f"{', '.join(sorted(role_map))}")
        role = role_map[raw_role]
        msg: dict[str, Any] = {"role": role, "content": _content(m.get(content_key), f"{at}.{content_key}")}
        calls = m.get("tool_calls") or m.get("function_call")
        if raw_role == "function_call":  # ShareGPT: the value is the call itself
            calls, msg["content"] = m.get(content_key), ""
        if calls and role == "assistant":
            msg["tool_calls"] = normalize_tool_calls(calls, f"{at}.tool_calls", tools)
        reasoning = m.get("reasoning_content")
        if reasoning:
            msg["reasoning_content"] = _text(reasoning, f"{at}.reasoning_content")
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = _text(m[key], f"{at}.{key}")
        weight = _weight(m.get("weight"), at, role)
        if weight is not None:
            msg["weight"] = weight
        used = MESSAGE_KEYS | {role_key, content_key}
        ignored.extend(f"{where}[].{k}" for k in m if k not in used)
        _add(out, msg)
    return check_conversation(out)


def _row_tools(row: dict, cols: dict[str, str], source_tools: list[dict] | None) -> list[dict] | None:
    raw = field_of(row, "tools", cols, required=False)
    if raw is None:
        raw = row.get("functions")  # OpenAI's legacy name
    return normalize_tools(raw, cols.get("tools", "tools")) or source_tools


def _keys(cols: dict[str, str], role: str, content: str) -> dict[str, str]:
    return {"role": cols.get(role, role), "content": cols.get(content, content)}


def adapt_messages(row: dict, cols: dict[str, str], tools: list[dict] | None = None) -> Example:
    ignored = unused_fields(row, ("messages", "tools", "functions"), cols)
    tools = _row_tools(row, cols, tools)
    msgs = _from_message_list(field_of(row, "messages", cols), cols.get("messages", "messages"),
                              _keys(cols, "role", "content"), MESSAGE_ROLES, tools, ignored)
    return Example(msgs, tools=tools, ignored=ignored)


def adapt_sharegpt(row: dict, cols: dict[str, str], tools: list[dict] | None = None) -> Example:
    ignored = unused_fields(row, ("conversations", "system", "tools"), cols)
    tools = _row_tools(row, cols, tools)
    msgs = _from_message_list(field_of(row, "conversations", cols), cols.get("conversations", "conversations"),
                              _keys(cols, "from", "value"), SHAREGPT_ROLES, tools, ignored)
    system = field_of(row, "system", cols, required=False)
    if system is not None and _text(system, "system"):
        if msgs[0]["role"] == "system":
            raise RowError("bad_order", "the row has a top-level system field and a system turn; keep one")
        msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    return Example(check_conversation(msgs), tools=tools, ignored=ignored)


def _history(value: Any) -> list[dict]:
    if isinstance(value, str):
        value = _parse_messages(value, "history") if value.strip() else []
    if not isinstance(value, list):
        raise RowError("bad_type", f"history must be a list of [instruction, reply] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("bad_type", f"history[{i}] must be an [instruction, reply] pair")
        out += [{"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
                {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")}]
    return out


def adapt_alpaca(row: dict, cols: dict[str, str], tools: list[dict] | None = None) -> Example:
    ignored = unused_fields(row, ("instruction", "input", "output", "system", "history"), cols)
    instruction = _text(field_of(row, "instruction", cols), "instruction")
    extra = field_of(row, "input", cols, required=False)
    user = instruction + ("\n\n" + _text(extra, "input") if extra and str(extra).strip() else "")
    history = field_of(row, "history", cols, required=False)
    msgs = _history(history) if history else []
    msgs += [{"role": "user", "content": user},
             {"role": "assistant", "content": _text(field_of(row, "output", cols), "output")}]
    system = field_of(row, "system", cols, required=False)
    if system and str(system).strip():
        msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    return Example(check_conversation(msgs), tools=tools, ignored=ignored)


def adapt_completion(row: dict, cols: dict[str, str], tools: list[dict] | None = None) -> Example:
    ignored = unused_fields(row, ("prompt", "completion"), cols)
    msgs = [{"role": "user", "content": _text(field_of(row, "prompt", cols), "prompt")},
            {"role": "assistant", "content": _text(field_of(row, "completion", cols), "completion")}]
    return Example(check_conversation(msgs), tools=tools, ignored=ignored)


CHAT_ADAPTERS: dict[str, Callable[..., Example]] = {
    "messages": adapt_messages, "sharegpt": adapt_sharegpt, "alpaca": adapt_alpaca, "completion": adapt_completion,
}
