"""Rendering conversations with the model's own chat template, and the loss mask.

Why our own masking instead of trl's `assistant_only_loss`: trl needs `{% generation %}` markers in
the template; for the stock Qwen2.5 template it swaps in its own training variant whose mask also
covers the newline before and after each reply (STACK.md), and for other templates without markers
it raises. We want exactly the reply tokens plus the end-of-turn token that closes each reply, with
the model's unmodified template, so that what we train on is what inference renders.

How: render prefixes (messages[:i] with the generation prompt, messages[:i+1]) to find each reply's
character span in the fully rendered text, then tokenize the full text once with offsets and label
the tokens inside [reply start, reply end) plus the first special token after the reply (the
end-of-turn, e.g. <|im_end|>). This works for any template that is prefix-stable (rendering a
conversation's prefix gives a prefix of the full rendering), which we check on every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.data.sources import RowError
from finetune.errors import DataError


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


def render_text(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (no tokenization)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; use an instruct/chat model or "
                        "set one on the tokenizer (tokenizer.chat_template = ...)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError / raise_exception() messages of the template itself
        raise RowError("template_error", f"the chat template refused this conversation: {e}") from None


def render_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of `messages` plus the generation prompt: what the model sees before it replies.

    Equals the training row's input_ids up to where its last reply starts (prefix contract), because
    both come from the same template text tokenized the same way (no extra special tokens: the
    template already writes any BOS it wants).
    """
    text = render_text(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """Full text and (reply start, reply end, turn end) character spans of every assistant message."""
    full = render_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_text(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                "the chat template is not prefix-stable: rendering the first "
                f"{i} messages (+ generation prompt) is not a prefix of rendering the whole conversation, so the "
                "prompt seen at inference would differ from training. Templates that rewrite earlier turns "
                "(e.g. strip reasoning from past replies) are not supported; use a template without that")
        start = len(prompt)
        if not upto.startswith(m["content"], start):
            raise DataError("the chat template changes assistant content (e.g. trims it or adds text before it), "
                            f"so replies cannot be located for the loss mask: {upto[start:start + 40]!r}")
        spans.append((start, start + len(m["content"]), len(upto)))
    return full, spans


def _eot_index(tokenizer: Any, ids: list[int], offsets: list, first: int, end: int, special: set[int]) -> int:
    """Index of the end-of-turn token: the first special token after a reply, inside its turn."""
    for t in range(first, len(ids)):
        if offsets[t][0] >= end:
            break
        if ids[t] in special:
            return t
    raise DataError("the chat template does not close assistant replies with a special end-of-turn token "
                    f"(looked for one of {sorted(tokenizer.convert_ids_to_tokens(sorted(special)))[:6]}), so the "
                    "model would never learn to stop; use a template that ends each turn with one")


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


def _check_content(messages: list[dict], specials: Specials) -> None:
    # Text like "<|im_end|>" inside a message would be tokenized as the real control token: the row
    # would teach the model to end turns mid-reply (or let data forge turns). Refuse such rows.
    for i, m in enumerate(messages):
        for text in specials.texts:
            if text in m["content"]:
                raise RowError("special_token_in_text", f"messages[{i}] contains the special token text {text!r}; "
                                                        "remove or escape it in the data")


def encode(tokenizer: Any, messages: list[dict], train_on: str, specials: Specials | None = None) -> Encoded:
    """Tokenize one conversation and build its loss mask.

    train_on: all_assistant (every reply + its end-of-turn), last_assistant (only the final reply),
    everything (every token). Raises RowError when a reply does not start on a token boundary (the
    prefix contract with render_prompt would break), DataError for unusable templates.
    """
    specials = special_tokens(tokenizer) if specials is None else specials
    _check_content(messages, specials)
    full, spans = reply_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [1 if train_on == "everything" else 0] * len(ids)
    starts = []
    trained = spans if train_on != "last_assistant" else spans[-1:]
    t = 0
    for start, end, turn_end in spans:
        while t < len(ids) and offsets[t][0] < start:
            if offsets[t][1] > start:
                raise RowError("token_boundary", "a token spans the boundary between prompt and reply (reply "
                                                 "starts with unusual whitespace?); the inference prompt would "
                                                 "tokenize differently")
            t += 1
        starts.append(t)
        if (start, end, turn_end) not in trained or train_on == "everything":
            continue
        first = t
        while t < len(ids) and offsets[t][0] < end:
            mask[t] = 1
            t += 1
        if t == first:
            raise RowError("empty_reply", "an assistant reply renders to no tokens")
        mask[_eot_index(tokenizer, ids, offsets, t, turn_end, specials.ids)] = 1
    return Encoded(ids, mask, starts)
