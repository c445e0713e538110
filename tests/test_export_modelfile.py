"""The Ollama Modelfile's TEMPLATE is measured from the Jinja chat template and must rebuild it exactly (issue 9, item 2)."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.export.ollama import go_template, template_parts, write_modelfile

# Written for these tests, in the shapes real templates take.
DEFAULT_SYSTEM = (  # Qwen2.5's shape: a default system turn when the chat does not start with one
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADERS_WITH_BOS = (  # Llama 3's shape: BOS once, role headers, content trimmed
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
COUNTS_TURNS = (  # output depends on the position, not only role and content: not expressible
    "{% for m in messages %}[{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
SYSTEM_FOLDED_INTO_USER = (  # Llama 2's shape: the system text is moved inside the first user turn
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}")


@pytest.fixture
def tok(tiny_tokenizer):
    original = tiny_tokenizer.chat_template
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = original


def test_chatml_parts(tok):
    parts, reason = template_parts(tok)
    assert reason == "" and parts.no_system_start == ""
    assert parts.prefix == {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
    assert set(parts.suffix.values()) == {"<|im_end|>\n"} and parts.generation == "<|im_start|>assistant\n"


def test_default_system_turn_and_bos_are_found(tok):
    tok.chat_template = DEFAULT_SYSTEM
    parts, _ = template_parts(tok)
    assert parts.no_system_start == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    tok.chat_template = HEADERS_WITH_BOS
    parts, _ = template_parts(tok)
    assert parts.no_system_start == "<|begin_of_text|>" and parts.prefix["system"].startswith("<|begin_of_text|>")
    assert parts.suffix["user"] == "<|eot_id|>"


@pytest.mark.parametrize("template,why", [(COUNTS_TURNS, "not rendered alike"),
                                          (SYSTEM_FOLDED_INTO_USER, "system message's content is not written once")])
def test_templates_that_need_more_than_role_and_content_are_not_guessed(tok, template, why):
    tok.chat_template = template
    parts, reason = template_parts(tok)
    assert parts is None and re.search(why, reason)


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(system=st.one_of(st.none(), text), turns=st.lists(st.tuples(text, text), min_size=1, max_size=3),
       template=st.sampled_from([None, DEFAULT_SYSTEM, HEADERS_WITH_BOS]))
def test_parts_rebuild_the_jinja_rendering_of_any_chat(tiny_tokenizer, system, turns, template):
    tok = tiny_tokenizer
    original = tok.chat_template
    tok.chat_template = template or original
    try:
        parts, _ = template_parts(tok)
        msgs = [{"role": "system", "content": system}] if system is not None else []
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if template == HEADERS_WITH_BOS:  # trims contents: the Go template sends them as they are
            msgs = [{**m, "content": m["content"].strip() or "x"} for m in msgs]
        for upto, gen in ((msgs, False), (msgs[:-1], True)):
            assert parts.render(upto, gen) == tok.apply_chat_template(upto, tokenize=False, add_generation_prompt=gen)
    finally:
        tok.chat_template = original


def test_go_template_quotes_every_literal(tok):
    tok.chat_template = DEFAULT_SYSTEM
    go = go_template(template_parts(tok)[0])
    # literals only inside {{ "..." }}: the {{- trimming cannot eat a newline that belongs to the template
    outside = "".join(chunk.split("}}", 1)[-1] for chunk in go.split("{{"))
    assert outside.strip("\n") == ""
    assert '{{ "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n" }}' in go
    assert go.count("{{- range") == 1 and go.count("{{ .Content }}") == 3
    assert '(ne (index .Messages 0).Role "system")' in go


def test_modelfile_without_a_usable_template_says_why(tok, tmp_path):
    tok.chat_template = COUNTS_TURNS
    info = write_modelfile(tmp_path, "m-f16.gguf", tok, [tok.convert_tokens_to_ids("<|im_end|>")], None, "m")
    text = (tmp_path / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "# No TEMPLATE: user turns" in text
    assert info == {"template": False, "template_note": info["template_note"], "system": None, "stop": ["<|im_end|>"]}
    assert text.splitlines()[1] == "FROM ./m-f16.gguf" and 'PARAMETER stop "<|im_end|>"' in text


def test_sampling_settings_follow_generation_config(tok, tmp_path):
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    write_modelfile(tmp_path, "m.gguf", tok, [], gen, "m")
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[-4:] == ["PARAMETER temperature 0.7", "PARAMETER top_p 0.8", "PARAMETER top_k 20",
                          "PARAMETER repeat_penalty 1.05"]


def test_default_system_prompt_becomes_the_modelfiles_system(tok, tmp_path):
    """Qwen2.5 / SmolLM2 shape: Ollama sends SYSTEM as the first message, which renders as the default turn."""
    tok.chat_template = DEFAULT_SYSTEM
    info = write_modelfile(tmp_path, "m.gguf", tok, [], None, "m")
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert info["system"] == "You are a helpful assistant." and 'SYSTEM """You are a helpful assistant."""' in lines
    parts = template_parts(tok)[0]
    chat = [{"role": "user", "content": "Hi"}]
    with_system = [{"role": "system", "content": info["system"]}] + chat
    assert parts.render(with_system, True) == parts.render(chat, True) == tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    tok.chat_template = HEADERS_WITH_BOS  # starts with BOS, not with a system turn: no SYSTEM line
    assert write_modelfile(tmp_path, "m.gguf", tok, [], None, "m")["system"] is None
    assert not any(line.startswith("SYSTEM") for line in (tmp_path / "Modelfile").read_text().splitlines())
