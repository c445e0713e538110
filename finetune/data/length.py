"""Length policy (data.too_long): drop | truncate_prompt | raise. A target token is never cut.

truncate_prompt first drops the earliest exchanges (user turn + replies, the system message is kept),
then cuts the beginning of the last user message, keeping its end (nearest the reply). The shortened
conversation is what gets stored in the row's `messages`, so eval re-renders exactly the trained
prompt. When even a one-token prompt leaves no room for the target, the row is dropped and counted
("reply_too_long"), never cut.
"""
from __future__ import annotations

from typing import Any

from finetune.data.render import Encoded, Specials
from finetune.data.render import encode as encode_one
from finetune.errors import DataError

# Cutting the user message is token-based but re-rendered as text; tokens may merge differently at
# the new edge, so a few attempts with a growing margin settle it.
_CUT_ATTEMPTS = 4


def _drop_first_exchange(messages: list[dict]) -> list[dict] | None:
    """Messages without the earliest user turn and its replies, or None if only the last exchange is left."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    if len(users) < 2:
        return None
    return head + body[users[1]:]


def _cut_last_user(tokenizer: Any, messages: list[dict], excess: int) -> list[dict] | None:
    """Messages with `excess` tokens cut from the start of the last user message, or None if it would be empty."""
    i = max(k for k, m in enumerate(messages) if m["role"] == "user")
    ids = tokenizer(messages[i]["content"], add_special_tokens=False)["input_ids"]
    if excess >= len(ids):
        return None
    kept = tokenizer.decode(ids[excess:]).strip()
    if not kept:
        return None
    return messages[:i] + [{"role": "user", "content": kept}] + messages[i + 1:]


def fit_length(tokenizer: Any, messages: list[dict], *, max_length: int, too_long: str, train_on: str,
               specials: Specials, tools: list[dict] | None = None,
               train_on_reasoning: bool = True, last_only: bool = False) -> tuple[list[dict], Encoded | None, str]:
    """Encode `messages` within max_length according to the policy.

    Returns (messages actually used, encoding or None when dropped, drop reason or "truncated" or "").
    Raises DataError for too_long=raise.
    """
    def encode(tokenizer: Any, messages: list[dict], train_on: str, specials: Specials) -> Encoded:
        return encode_one(tokenizer, messages, train_on, specials, tools=tools, train_on_reasoning=train_on_reasoning,
                          last_only=last_only)

    enc = encode(tokenizer, messages, train_on, specials)
    if len(enc.input_ids) <= max_length:
        return messages, enc, ""
    if too_long == "raise":
        raise DataError(f"row is {len(enc.input_ids)} tokens, longer than data.max_length={max_length}. "
                        "Raise data.max_length, or set data.too_long=drop (skip such rows) or truncate_prompt")
    if too_long == "drop":
        return messages, None, "too_long"
    while len(enc.input_ids) > max_length:
        shorter = _drop_first_exchange(messages)
        if shorter is None:
            break
        messages = shorter
        enc = encode(tokenizer, messages, train_on, specials)
    margin = 0
    for _ in range(_CUT_ATTEMPTS):
        if len(enc.input_ids) <= max_length:
            return messages, enc, "truncated"
        shorter = _cut_last_user(tokenizer, messages, len(enc.input_ids) - max_length + margin)
        if shorter is None:
            break
        messages, margin = shorter, margin + 2
        enc = encode(tokenizer, messages, train_on, specials)
    if len(enc.input_ids) <= max_length:
        return messages, enc, "truncated"
    return messages, None, "reply_too_long"
