"""Mask invariants (hypothesis) for tool-call rows and for reasoning rows under a template that is not prefix-stable.

Every row has a label; each trained reply's end-of-turn is a label; no prompt, tool-definition or tool-result
token is a label; the generation prompt (with tools) of each prefix equals the training ids up to that reply.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from finetune.config.data import DataConfig, SourceConfig
from finetune.data import render_prompt
from finetune.data.build import _encode_rows
from finetune.data.formats import Example, check_conversation
from finetune.data.render import encode, special_tokens
from finetune.data.tools import normalize_tools

WORD = st.text("abcdefghij klmnop", min_size=1, max_size=12).map(str.strip).filter(bool)
TOOLS = normalize_tools([{"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}])
EXAMPLES = int(os.environ.get("FINETUNE_HYPOTHESIS_EXAMPLES", "30"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tool_conversations(draw):
    msgs = [{"role": "system", "content": draw(WORD)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 2))):
        msgs.append({"role": "user", "content": draw(WORD)})
        for _ in range(draw(st.integers(0, 2))):  # tool rounds: a call, then one or two results
            calls = [{"type": "function", "function": {"name": "lookup", "arguments": {"q": draw(WORD)}}}
                     for _ in range(draw(st.integers(1, 2)))]
            msgs.append({"role": "assistant", "content": draw(st.sampled_from(["", "Let me look."])),
                         "tool_calls": calls})
            msgs += [{"role": "tool", "content": f"RESULT {draw(WORD)}"} for _ in calls]
        reply = {"role": "assistant", "content": draw(WORD)}
        if draw(st.booleans()):
            reply["weight"] = draw(st.sampled_from([0, 1]))
        msgs.append(reply)
    if all(m.get("weight") == 0 for m in msgs if m["role"] == "assistant"):
        msgs[-1]["weight"] = 1
    return check_conversation(msgs)


def runs(mask):
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@SETTINGS
@given(msgs=tool_conversations(), train_on=st.sampled_from(["all_assistant", "last_assistant"]))
def test_tool_call_masks(tools_tok, msgs, train_on):
    assume(train_on == "all_assistant" or msgs[-1].get("weight", 1) != 0)  # else a bad row (nothing to train)
    enc = encode(tools_tok, msgs, train_on, tools=TOOLS)
    ids, mask = enc.input_ids, enc.assistant_masks
    im_end = tools_tok.convert_tokens_to_ids("<|im_end|>")
    asst = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i, start in zip(asst, enc.reply_starts):
        assert ids[:start] == render_prompt(tools_tok, msgs[:i], TOOLS)  # inference prompt == training prefix
    trained = [s for i, s in zip(asst, enc.reply_starts) if msgs[i].get("weight", 1) != 0]
    if train_on == "last_assistant":
        trained = trained[-1:] if msgs[-1].get("weight", 1) != 0 else []
    assert sum(mask) >= 1
    assert [a for a, _ in runs(mask)] == trained  # labels start exactly where replies start
    for a, b in runs(mask):
        assert ids[b - 1] == im_end  # the end-of-turn closing each reply is labelled
        text = tools_tok.decode(ids[a:b])
        assert "RESULT" not in text and "<tool_response>" not in text and "<|im_start|>" not in text
    labelled_calls = sum(tools_tok.decode(ids[a:b]).count("<tool_call>") for a, b in runs(mask))
    expected_calls = sum(len(msgs[i].get("tool_calls", [])) for i, s in zip(asst, enc.reply_starts) if s in trained)
    assert labelled_calls == expected_calls  # every trained call is labelled whole


@st.composite
def reasoning_conversations(draw):
    msgs = []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(WORD)})
        reply = {"role": "assistant", "content": draw(WORD)}
        if draw(st.booleans()):
            reply["reasoning_content"] = "THINK " + draw(WORD)
        msgs.append(reply)
    return msgs


@SETTINGS
@given(msgs=reasoning_conversations(), train_on_reasoning=st.booleans())
def test_reasoning_rows_one_per_turn_rendered_as_inference(reasoning_tok, msgs, train_on_reasoning):
    cfg = DataConfig(sources=[SourceConfig(path="x.jsonl")], max_length=4096, train_on_reasoning=train_on_reasoning)
    rows = _encode_rows(reasoning_tok, cfg, special_tokens(reasoning_tok), Example(msgs))
    n_replies = sum(m["role"] == "assistant" for m in msgs)
    assert len(rows) == n_replies  # one row per assistant turn (a single turn is its own row)
    for ex, enc, _ in rows:
        prompt = render_prompt(reasoning_tok, ex.messages[:-1])
        assert enc.input_ids[:len(prompt)] == prompt
        (a, b), = runs(enc.assistant_masks)  # exactly one labelled run: the last reply
        assert a >= len(prompt) and enc.input_ids[b - 1] == reasoning_tok.convert_tokens_to_ids("<|im_end|>")
        labelled = reasoning_tok.decode(enc.input_ids[a:b])
        assert labelled.endswith(ex.messages[-1]["content"] + "<|im_end|>")
        assert ("THINK" in labelled) == (train_on_reasoning and "reasoning_content" in ex.messages[-1])
        for earlier in ex.messages[:-1]:  # history as inference shows it: past reasoning stripped
            assert "reasoning_content" not in earlier or earlier["reasoning_content"] not in reasoning_tok.decode(
                prompt)
