"""The embedded model: built offline, deterministic, and its tokenizer survives a save/reload."""
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.models.tiny import SPECIAL_TOKENS, _corpus, _train_tokenizer

SAMPLES = [
    "Hello, world!",
    '{"name": "Åsa Öberg", "age": 41, "tags": ["x", "y"]}',
    "  leading spaces\n\nand\ttabs, unicode: 你好, émigré, naïve — ok?",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def test_tokenizer_round_trip_matches_the_trained_one(tiny_dir):
    reloaded = AutoTokenizer.from_pretrained(tiny_dir)
    fresh = _train_tokenizer(_corpus())
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    for text in SAMPLES:
        assert reloaded.encode(text) == fresh.encode(text), text
        assert reloaded.decode(reloaded.encode(text)) == text


def test_special_tokens_and_chat_template(tiny_tokenizer):
    ids = tiny_tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == sorted(ids) and len(set(ids)) == 3  # in Qwen2.5's order
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    for tok in SPECIAL_TOKENS:  # each special token is one id, never split
        assert len(tiny_tokenizer.encode(tok)) == 1
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_model_shape_and_determinism(tiny_dir, tmp_path, monkeypatch):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["tie_word_embeddings"] is True
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    from finetune.models.tiny import tiny_model_dir

    rebuilt = tiny_model_dir()
    assert rebuilt != tiny_dir and rebuilt.name == tiny_dir.name
    a = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(rebuilt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
