"""Schema-constrained decoding: the random tiny model writes garbage; under the mask every row is valid JSON."""
import json
import sys

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.generate.constrained import check_available, json_schema_processor
from finetune.errors import FinetuneError

# Bounded on purpose: the mask keeps every prefix valid but cannot make a model that does not know the
# format finish a string, number or array (see the limitation in finetune/generate/constrained.py).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "status": {"type": "string", "enum": ["open", "paid", "shipped"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 6},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "paid": {"type": "boolean"},
    },
    "required": ["id", "status", "items", "paid"],
    "additionalProperties": False,
}
SCHEMAS = [PERSON, ORDER, PERSON, ORDER]
MAX_NEW = 256  # > the ~200 bytes the bounded schemas allow without escapes; rows stop at eos long before


@pytest.fixture(scope="module")
def tok(tiny_dir):
    t = AutoTokenizer.from_pretrained(tiny_dir)  # our own copy: padding_side must not leak to other tests
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def encode(tok, schemas):
    # Prompts of different lengths, so the batch is really left-padded.
    texts = [tok.apply_chat_template(
        [{"role": "user", "content": f"Reply with JSON {'!' * i}matching: {json.dumps(s)[:30 + 9 * i]}"}],
        add_generation_prompt=True, tokenize=False) for i, s in enumerate(schemas)]
    return tok(texts, return_tensors="pt", padding=True)


def generate(model, tok, schemas, constrained=True, **kw):
    enc = encode(tok, schemas)
    kw = {"max_new_tokens": MAX_NEW, "do_sample": False, "pad_token_id": tok.pad_token_id,
          "eos_token_id": [tok.eos_token_id, tok.pad_token_id], **kw}
    if constrained:
        kw["logits_processor"] = [json_schema_processor(tok, schemas, model.config.vocab_size)]
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def is_valid(tok, row, schema):
    text = tok.decode([t for t in row if t not in (tok.eos_token_id, tok.pad_token_id)])
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def assert_valid_and_closed(tok, rows, schemas):
    for row, schema in zip(rows, schemas):
        text = tok.decode(row)
        assert tok.eos_token_id in row, f"never finished: {text!r}"
        end = row.index(tok.eos_token_id)
        assert all(t == tok.pad_token_id for t in row[end + 1:]), f"not only padding after eos: {text!r}"
        value = json.loads(tok.decode(row[:end]))
        jsonschema.validate(value, schema)


def test_constrained_batch_is_valid_json_and_ends_with_eos(model, tok):
    assert len(tok) < model.config.vocab_size  # padded embedding: ids past the tokenizer must stay masked
    rows = generate(model, tok, SCHEMAS)
    assert_valid_and_closed(tok, rows, SCHEMAS)


def test_unconstrained_output_of_the_same_model_is_not_valid(model, tok):
    rows = generate(model, tok, SCHEMAS, constrained=False, max_new_tokens=48)
    assert not any(is_valid(tok, row, s) for row, s in zip(rows, SCHEMAS))


def test_sampling_is_valid_too(model, tok):
    rows = generate(model, tok, SCHEMAS, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    assert_valid_and_closed(tok, rows, SCHEMAS)


def test_num_return_sequences_repeats_each_rows_schema(model, tok):
    rows = generate(model, tok, [PERSON, ORDER], do_sample=True, top_k=0, num_return_sequences=2)
    assert_valid_and_closed(tok, rows, [PERSON, PERSON, ORDER, ORDER])


def test_keys_come_in_each_schemas_own_property_order(model, tok):
    reordered = {**PERSON, "properties": dict(reversed(PERSON["properties"].items()))}
    rows = generate(model, tok, [PERSON, reordered])
    for row, schema in zip(rows, [PERSON, reordered]):
        value = json.loads(tok.decode(row[:row.index(tok.eos_token_id)]))
        assert list(value) == list(schema["properties"])


def test_greedy_batch_equals_one_by_one(model, tok):
    batch = generate(model, tok, SCHEMAS)
    for i, schema in enumerate(SCHEMAS):
        enc = encode(tok, SCHEMAS)  # same prompt text as row i of the batch, without the padding
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()][None]
        proc = json_schema_processor(tok, [schema], model.config.vocab_size)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=[proc],
                                 max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id, tok.pad_token_id])
        alone = out[0, ids.shape[1]:].tolist()
        strip = lambda r: [t for t in r if t != tok.pad_token_id]  # noqa: E731
        assert strip(alone) == strip(batch[i]), (tok.decode(alone), tok.decode(batch[i]))


def test_a_complete_value_allows_only_eos_then_only_padding(model, tok):
    vocab = model.config.vocab_size
    proc = json_schema_processor(tok, [PERSON], vocab)
    answer = tok.encode('{"name":"Ada","age":36,"role":"admin","tags":["x"]}')
    ids = encode(tok, [PERSON])["input_ids"]
    allowed = lambda scores: torch.isfinite(scores[0]).nonzero().flatten().tolist()  # noqa: E731
    for token in answer:  # feed the answer as generate() would, one token per step
        assert token in allowed(proc(ids, torch.zeros(1, vocab)))
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert allowed(proc(ids, torch.zeros(1, vocab))) == [tok.eos_token_id]
    ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], 1)
    assert allowed(proc(ids, torch.zeros(1, vocab))) == [tok.pad_token_id]


def test_processor_is_single_use(model, tok):
    vocab = model.config.vocab_size
    proc = json_schema_processor(tok, [PERSON], vocab)
    ids = encode(tok, [PERSON])["input_ids"]
    proc(ids, torch.zeros(1, vocab))
    with pytest.raises(FinetuneError, match="single-use"):
        proc(ids, torch.zeros(1, vocab))  # a second generate call with the same processor


def test_errors_name_the_problem(model, tok):
    vocab = model.config.vocab_size
    with pytest.raises(FinetuneError, match="row 1.*Invalid type"):
        json_schema_processor(tok, [PERSON, {"type": "strin"}], vocab)
    with pytest.raises(FinetuneError, match="model.config.vocab_size"):
        json_schema_processor(tok, [PERSON], len(tok) - 1)
    proc = json_schema_processor(tok, [PERSON, ORDER], vocab)
    with pytest.raises(FinetuneError, match="one schema per row"):
        proc(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, vocab))


def test_check_available_gives_an_install_hint(monkeypatch):
    check_available()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # makes `import llguidance` fail
    with pytest.raises(FinetuneError, match="pip install"):
        check_available()
