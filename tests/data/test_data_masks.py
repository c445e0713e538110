"""Loss masks on random conversations (hypothesis), with the tiny template and a Qwen2.5-style one.

Properties: every row has a label; the end-of-turn after each trained reply is a label; no prompt
token is a label; decoded label spans are exactly the replies (+ end-of-turn); the generation prompt
of every prefix equals the training ids up to that reply (the inference contract).
"""
from __future__ import annotations

import copy
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import render_prompt
from finetune.data.render import encode, reply_spans
from finetune.errors import DataError

ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn", "Zl", "Zp"),
                         include_characters="\n\t")
TEXT = st.text(ALPHABET, min_size=1, max_size=40).map(str.strip).filter(bool).filter(lambda t: "<|" not in t)


@st.composite
def conversations(draw):
    msgs = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    return msgs


def runs(mask):
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def check(tok, msgs, train_on):
    enc = encode(tok, msgs, train_on)
    ids, mask = enc.input_ids, enc.assistant_masks
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert sum(mask) >= 1
    # contract: the generation prompt of each prefix is the training prefix, token for token
    asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i, start in zip(asst, enc.reply_starts):
        assert ids[:start] == render_prompt(tok, msgs[:i])
    if train_on == "everything":
        assert all(mask)
        return
    trained = replies if train_on == "all_assistant" else replies[-1:]
    starts = enc.reply_starts if train_on == "all_assistant" else enc.reply_starts[-1:]
    assert [a for a, _ in runs(mask)] == starts  # labels start exactly at reply starts: no header/prompt token
    assert len(runs(mask)) == len(trained)
    for (a, b), reply in zip(runs(mask), trained):
        assert ids[b - 1] == im_end  # the end-of-turn closing the reply is a label
        assert tok.decode(ids[a:b]) == unicodedata.normalize("NFC", reply) + "<|im_end|>"
        assert tok.decode(ids[b:b + 1]) == "\n"  # ...and the newline after it is not


# FINETUNE_HYPOTHESIS_EXAMPLES=1000 for a deeper search than the default run affords.
EXAMPLES = int(os.environ.get("FINETUNE_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(msgs=conversations(), train_on=st.sampled_from(["all_assistant", "last_assistant", "everything"]))
def test_masks_tiny_template(tiny_tok, msgs, train_on):
    check(tiny_tok, msgs, train_on)


@SETTINGS
@given(msgs=conversations(), train_on=st.sampled_from(["all_assistant", "last_assistant"]))
def test_masks_qwen25_template_with_default_system(qwen_tok, msgs, train_on):
    check(qwen_tok, msgs, train_on)
    if msgs[0]["role"] != "system":
        text = qwen_tok.decode(encode(qwen_tok, msgs, train_on).input_ids)
        assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen_default_system_is_rendered_at_inference_too(qwen_tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = render_prompt(qwen_tok, msgs[:1])
    assert qwen_tok.decode(prompt).startswith("<|im_start|>system\nYou are Qwen")
    assert encode(qwen_tok, msgs, "all_assistant").input_ids[:len(prompt)] == prompt


MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]


def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_template_that_is_not_prefix_stable_is_refused(tiny_tok):
    # renders the number of messages first: a prefix renders differently from the whole conversation
    tok = _with_template(tiny_tok, "{{ messages|length }}" + tiny_tok.chat_template)
    with pytest.raises(DataError, match="not prefix-stable"):
        reply_spans(tok, MSGS)


def test_template_without_end_of_turn_token_is_refused(tiny_tok):
    tok = _with_template(tiny_tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="end-of-turn"):
        encode(tok, MSGS, "all_assistant")


def test_template_that_rewrites_content_is_refused(tiny_tok):
    tok = _with_template(tiny_tok, tiny_tok.chat_template.replace("message['content']", "message['content'] | upper"))
    with pytest.raises(DataError, match="changes assistant content"):
        encode(tok, MSGS, "all_assistant")


def test_build_names_the_row_for_template_errors(build, write_jsonl, chat, tiny_tok):
    tok = _with_template(tiny_tok, "{{ messages|length }}" + tiny_tok.chat_template)
    path = write_jsonl([chat()])
    with pytest.raises(DataError, match=r"data\.jsonl:1: the chat template is not prefix-stable"):
        build({"path": path}, tokenizer=tok)
