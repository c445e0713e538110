"""Fixtures of the data-stage tests: the embedded tiny tokenizer (+ a Qwen2.5-template copy), file writers."""
from __future__ import annotations

import copy
import json

import pytest

# Qwen2.5-Instruct's template without the tool-calling branches: ChatML that injects a default
# system prompt when the conversation has no system message.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def tiny_tok():
    from finetune.models.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="session")
def qwen_tok(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = QWEN25_TEMPLATE
    return tok


@pytest.fixture()
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture()
def write_jsonl(tmp_path):
    """write_jsonl(rows, name="data.jsonl") -> path str; rows may be dicts or raw str lines."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)

    return write


def _chat(user="What is 2 plus 2?", reply="2 plus 2 is 4.", system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def _make_cfg(*sources, **settings):
    """DataConfig with `sources` given as dicts (or path strings), cache off unless asked."""
    from finetune.config.data import DataConfig, SourceConfig

    srcs = [SourceConfig(path=s) if isinstance(s, str) else SourceConfig(**s) for s in sources]
    settings.setdefault("cache", False)
    return DataConfig(sources=srcs, **settings)


@pytest.fixture()
def build(tiny_tok, cache_dir):
    """build(*sources, tokenizer=tiny, **settings) -> DataSplits."""
    from finetune.data import build_datasets

    def run(*sources, tokenizer=None, **settings):
        return build_datasets(_make_cfg(*sources, **settings), tokenizer or tiny_tok, cache_dir=cache_dir)

    return run


@pytest.fixture()
def chat():
    """chat(user=..., reply=..., system=None) -> one messages-format row."""
    return _chat


@pytest.fixture()
def make_cfg():
    """make_cfg(*sources, **settings) -> DataConfig (sources as dicts or path strings; cache off by default)."""
    return _make_cfg


# Written for these tests in the shape of Qwen2.5-Instruct's tool-calling template: tool definitions in
# the system turn, calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as a
# user turn of <tool_response> blocks.
TOOLS_TEMPLATE = (
    "{%- set sys = messages[0].content if messages and messages[0].role == 'system' else 'You are a helpful bot.' %}"
    "{{- '<|im_start|>system\\n' + sys }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>' }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for c in m.tool_calls or [] %}{{- '\\n<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": '"
    " + (c.function.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# In the shape of Qwen3's template: reasoning is shown only for replies after the last user query, so a
# multi-turn conversation is not prefix-stable (earlier turns lose their reasoning).
REASONING_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set r = m.reasoning_content or '' %}"
    "{%- if loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + r + '\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def tools_tok(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = TOOLS_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def reasoning_tok(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = REASONING_TEMPLATE
    return tok
