"""Rendering conversations with the model's own chat template, and the loss mask.

Why our own masking instead of trl's `assistant_only_loss`: trl needs `{% generation %}` markers in
the template; for the stock Qwen2.5 template it swaps in its own training variant whose mask also
covers the newline before and after each reply (STACK.md), and for other templates without markers
it raises. We want exactly the reply tokens plus the end-of-turn token that closes each reply, with
the model's unmodified template, so that what we train on is what inference renders.

How: render prefixes (messages[:i] with the generation prompt, messages[:i+1]) to find where each
reply starts in the fully rendered text; the reply runs from there to the first special token (the
end-of-turn, e.g. <|im_end|>). That span is whatever the template writes for the turn: the content,
a tool call (`<tool_call>{"name": ...}</tool_call>` for Qwen2.5), a reasoning block. The full text is
tokenized once with offsets; tokens inside the span plus the end-of-turn token are labels
(data.train_on_reasoning=false starts the labels after the reasoning block instead).

Prefix stability (rendering a prefix gives a prefix of the whole) is checked on every row. Templates
that rewrite earlier turns (Qwen3 and DeepSeek-R1 drop past reasoning) are not prefix-stable over a
whole conversation; encode raises NotPrefixStable and the build makes one row per assistant turn,
each rendered exactly as inference sees that prefix (build.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from finetune.data.sources import RowError
from finetune.errors import DataError


class NotPrefixStable(DataError):
    """The template renders a prefix of the conversation differently from the whole (see module doc)."""


@dataclass(frozen=True)
class Specials:
    """The tokenizer's special tokens: ids that can close a turn, and texts that must not occur in content."""

    ids: frozenset
    texts: tuple


@dataclass
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]
    reply_starts: list[int]  # token index where each assistant reply starts (last = the target's)
    target: str = ""         # the text the template writes for the last reply (without end-of-turn)


@dataclass(frozen=True)
class Span:
    start: int        # where the reply starts (end of the generation prompt)
    end: int          # where the end-of-turn token starts
    turn_end: int     # end of the rendered turn
    label_start: int  # first labelled character (after the reasoning block when it is masked)


def render_text(tokenizer: Any, messages: list[dict], *, tools: list[dict] | None = None,
                add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (and tool definitions), no tokenization."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; use an instruct/chat model or "
                        "set one with model.chat_template (or tokenizer.chat_template = ...)")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError / raise_exception() messages of the template itself
        raise RowError("template_error", f"the chat template refused this conversation: {e}") from None


def render_prompt(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` (and `tools`) plus the generation prompt: what the model sees before it replies.

    Equals the training row's input_ids up to where its last reply starts (prefix contract), because
    both come from the same template text tokenized the same way (no extra special tokens: the
    template already writes any BOS it wants).
    """
    text = render_text(tokenizer, messages, tools=tools, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reasoning_of(message: dict) -> str:
    """The reasoning of an assistant message: reasoning_content, or a leading <think>...</think> block."""
    if message.get("reasoning_content"):
        return message["reasoning_content"]
    m = re.match(r"\s*<think>(.*?)</think>", message.get("content") or "", re.S)
    return m.group(1).strip() if m and m.group(1).strip() else ""


def _end_of_reply(text: str, start: int, specials: Specials) -> int:
    hits = [k for k in (text.find(t, start) for t in specials.texts) if k >= 0]
    if not hits:
        raise DataError("the chat template does not close assistant replies with a special end-of-turn token "
                        f"(looked for one of {list(specials.texts)[:6]}), so the model would never learn to "
                        "stop; use a template that ends each turn with one")
    return min(hits)


def reply_spans(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None,
                specials: Specials | None = None, train_on_reasoning: bool = True,
                last_only: bool = False) -> tuple[str, list[Span]]:
    """Full text and the Span of every assistant message (only the last one with last_only).

    Raises NotPrefixStable, DataError.
    """
    specials = special_tokens(tokenizer) if specials is None else specials
    full = render_text(tokenizer, messages, tools=tools)
    spans = []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != last):
            continue
        prompt = render_text(tokenizer, messages[:i], tools=tools, add_generation_prompt=True)
        upto = render_text(tokenizer, messages[: i + 1], tools=tools)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise NotPrefixStable(
                "the chat template is not prefix-stable: rendering the first "
                f"{i} messages (+ generation prompt) is not a prefix of rendering the whole conversation, so the "
                "prompt seen at inference would differ from training")
        start = len(prompt)
        end = _end_of_reply(upto, start, specials)
        region = upto[start:end]
        if m["content"] and m["content"] not in region:
            raise DataError("the chat template changes assistant content (e.g. trims it or adds text inside it), "
                            f"so replies cannot be located for the loss mask: {upto[start:start + 40]!r}")
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] not in region:
                raise DataError("the chat template does not render the assistant's tool_calls; use a model whose "
                                "template renders tools (e.g. Qwen2.5-Instruct) or set model.chat_template")
        label_start = start
        reasoning = reasoning_of(m)
        if reasoning and not train_on_reasoning:
            k = region.find(reasoning)
            if k >= 0:  # skip the reasoning and its closing tag ("\n</think>\n\n" for Qwen3)
                after = k + len(reasoning)
                label_start = start + after + re.match(r"\s*(</[\w|]+>)?\s*", region[after:]).end()
        spans.append(Span(start, end, len(upto), label_start))
    return full, spans


def _eot_index(ids: list[int], offsets: list, first: int, end: int, turn_end: int, special: frozenset) -> int:
    """Index of the end-of-turn token: the special token that starts at the reply's end."""
    for t in range(first, len(ids)):
        if offsets[t][0] >= turn_end:
            break
        if offsets[t][0] >= end and ids[t] in special:
            return t
    raise DataError("the end-of-turn text after a reply did not tokenize as a special token; check that the "
                    "tokenizer's special tokens match the chat template")


def special_tokens(tokenizer: Any) -> Specials:
    """The tokenizer's special tokens and added special tokens."""
    if not getattr(tokenizer, "is_fast", True):
        # Masks come from character offsets, which only the Rust ("fast") tokenizers report.
        raise DataError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer without offsets; load the "
                        "model's fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    texts = tuple(t for t in tokenizer.convert_ids_to_tokens(sorted(ids)) if t)
    return Specials(frozenset(ids), texts)


def _check_content(messages: list[dict], tools: list[dict] | None, specials: Specials) -> None:
    # Text like "<|im_end|>" inside a message would be tokenized as the real control token: the row
    # would teach the model to end turns mid-reply (or let data forge turns). Refuse such rows.
    for i, m in enumerate(messages):
        texts = [m["content"], m.get("reasoning_content") or "", m.get("name") or ""]
        if m.get("tool_calls"):
            texts.append(json.dumps(m["tool_calls"], ensure_ascii=False))
        for text in specials.texts:
            if any(text in t for t in texts):
                raise RowError("special_token_in_text", f"messages[{i}] contains the special token text {text!r}; "
                                                        "remove or escape it in the data")
    if tools:
        blob = json.dumps(tools, ensure_ascii=False)
        for text in specials.texts:
            if text in blob:
                raise RowError("special_token_in_text", f"the tool definitions contain the special token text {text!r}")


def _labelled(messages: list[dict], spans: list[Span], train_on: str) -> list[Span]:
    replies = [m for m in messages if m["role"] == "assistant"][-len(spans):]
    trained = [s for s, m in zip(spans, replies) if m.get("weight", 1) != 0]
    if train_on == "last_assistant":
        trained = [s for s in trained if s is spans[-1]]
    if not trained:
        raise RowError("nothing_to_train", "no assistant reply of this row is trained (weight 0, or "
                                           "data.train_on=last_assistant with a last reply of weight 0)")
    return trained


def encode(tokenizer: Any, messages: list[dict], train_on: str, specials: Specials | None = None, *,
           tools: list[dict] | None = None, train_on_reasoning: bool = True, last_only: bool = False) -> Encoded:
    """Tokenize one conversation and build its loss mask.

    train_on: all_assistant (every reply of weight != 0 + its end-of-turn), last_assistant (only the
    final reply), everything (every token). Raises RowError when a reply does not start on a token
    boundary (the prefix contract with render_prompt would break), NotPrefixStable / DataError for
    templates that cannot be used on this row. last_only: locate (and train) only the last reply, for
    the one-row-per-turn rows of templates that are not prefix-stable (earlier replies are history).
    """
    specials = special_tokens(tokenizer) if specials is None else specials
    _check_content(messages, tools, specials)
    full, spans = reply_spans(tokenizer, messages, tools, specials, train_on_reasoning, last_only)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    trained = spans if train_on == "everything" else _labelled(messages, spans, train_on)
    mask = [1 if train_on == "everything" else 0] * len(ids)
    starts = []
    t = 0
    for span in spans:
        t = _token_at(offsets, t, span.start)
        starts.append(t)
        if span not in trained or train_on == "everything":
            continue
        t = _token_at(offsets, t, span.label_start)
        first = t
        while t < len(ids) and offsets[t][0] < span.end:
            mask[t] = 1
            t += 1
        if t == first:
            raise RowError("empty_reply", "an assistant reply renders to no tokens")
        mask[_eot_index(ids, offsets, t, span.end, span.turn_end, specials.ids)] = 1
    last = spans[-1]
    return Encoded(ids, mask, starts, full[last.start:last.end])


def _token_at(offsets: list, t: int, char: int) -> int:
    """Index of the token starting at character `char` (scanning on from token t)."""
    while t < len(offsets) and offsets[t][0] < char:
        if offsets[t][1] > char:
            raise RowError("token_boundary", "a token spans the boundary between prompt and reply (reply "
                                             "starts with unusual whitespace?); the inference prompt would "
                                             "tokenize differently")
        t += 1
    return t


# --- what a template can render, probed once per build with made-up rows -------------------------
_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_lookup_fn", "description": "Look a probe up.",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}
_PROBE_CALL = {"type": "function", "function": {"name": "probe_lookup_fn", "arguments": {"probe_arg": "Probeville"}}}
FEATURE_NAMES = {"tools": "tool definitions (`tools`)", "tool_calls": "assistant tool calls (`tool_calls`)",
                 "tool_results": "tool results (role `tool`)", "reasoning": "reasoning (`reasoning_content`)",
                 "names": "message `name` fields"}


def template_support(tokenizer: Any) -> dict[str, bool]:
    """Which of FEATURE_NAMES the tokenizer's chat template renders (True) or silently drops / refuses."""
    def renders(marker: str, messages: list[dict], tools: list | None = None, gen: bool = False) -> bool:
        try:
            return marker in render_text(tokenizer, messages, tools=tools, add_generation_prompt=gen)
        except (RowError, DataError):
            return False

    user = {"role": "user", "content": "Hi"}
    call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    done = {"role": "assistant", "content": "Done."}
    return {
        "tools": renders("probe_lookup_fn", [user], [_PROBE_TOOL], gen=True),
        "tool_calls": renders("Probeville", [user, call], [_PROBE_TOOL]),
        "tool_results": renders("probe_result_17", [user, call, {"role": "tool", "content": "probe_result_17"}, done],
                                [_PROBE_TOOL]),
        "reasoning": renders("probe_reasoning_17", [user, {**done, "reasoning_content": "probe_reasoning_17"}]),
        "names": renders("probe_name_17", [{**user, "name": "probe_name_17"}, done]),
    }


@dataclass(frozen=True)
class ToolCallFormat:
    """How the template writes one tool call: prefix + {"name": ..., "arguments": ...} + suffix."""

    prefix: str
    suffix: str
    separators: tuple[str, str]  # item and key separators of the call's JSON, as json.dumps takes them


def tool_call_format(tokenizer: Any) -> ToolCallFormat | None:
    """The template's tool-call wire format, or None when it does not write a call as one JSON object."""
    user = {"role": "user", "content": "Hi"}
    call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    try:
        prompt = render_text(tokenizer, [user], tools=[_PROBE_TOOL], add_generation_prompt=True)
        upto = render_text(tokenizer, [user, call], tools=[_PROBE_TOOL])
        end = _end_of_reply(upto, len(prompt), special_tokens(tokenizer))
    except (RowError, DataError):
        return None
    region = upto[len(prompt):end]
    decoder = json.JSONDecoder()
    for k in (i for i, ch in enumerate(region) if ch == "{"):
        try:
            value, stop = decoder.raw_decode(region, k)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("name") == "probe_lookup_fn" and "arguments" in value:
            text = region[k:stop]
            return ToolCallFormat(region[:k], region[stop:],
                                  (", " if '", "' in text else ",", ": " if '": ' in text else ":"))
    return None
