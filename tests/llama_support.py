"""A small random Llama model shaped like SmolLM2-135M-Instruct, built offline in a few seconds.

What it shares with SmolLM2 (so the Llama paths run as for the real model): LlamaForCausalLM with GQA and tied
embeddings, rope theta 1e5, a GPT-2-style byte-level BPE (GPT-2's split regex, optionally each digit apart first as
in SmolLM's own tokenizer.json), `<|endoftext|>`/`<|im_start|>`/`<|im_end|>` as ids 0/1/2 with `<|im_start|>` as BOS
(never added) and `<|im_end|>` as EOS and pad, and SmolLM2's ChatML template that injects a default system prompt.
What it does not: 2 layers of width 64 and a ~1k vocabulary instead of 30 x 576 and 49,152, so that training it
for a few dozen steps takes seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.paths import DEMO_DATA_DIR

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-135M-Instruct's chat template, as stored in its GGUF file (tokenizer.chat_template).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_ARCH = dict(
    hidden_size=64,
    intermediate_size=192,  # multiples of 64: bitsandbytes' CPU 4-bit blocks and GGUF's 32-value q8_0 blocks
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA as in SmolLM2 (9 / 3): k is permuted over its own 2 heads in the GGUF export
    head_dim=16,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
# Digits after runs of spaces and newlines: where GPT-2's regex alone and SmolLM's digit split disagree
# ("    1" is one space token + "1" with the digit split, four spaces + " 1"'s space without it).
_EXTRA_CORPUS = ['{\n    "a": 1,\n    "b": [\n        12,\n        345\n    ]\n}', "x  1  22   333\n\n 4444 2026-12-01"]


def _corpus() -> list[str]:
    texts = list(_EXTRA_CORPUS) + [SMOLLM2_TEMPLATE, DEFAULT_SYSTEM]
    for path in sorted(DEMO_DATA_DIR.glob("*.jsonl")):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    return texts


def gpt2_style_tokenizer(digits: bool = False, vocab_size: int = 1024):
    """A byte-level BPE trained on the demo data with GPT-2's pre-tokenizer (digits=True: SmolLM's, each digit
    split off first), wrapped as transformers' tokenizers backend with SmolLM2's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = SMOLLM2_TEMPLATE
    tok.model_max_length = LLAMA_ARCH["max_position_embeddings"]
    return tok


def build_tiny_llama(out: Path, *, digits: bool = False, **arch) -> Path:
    """Save a random small LlamaForCausalLM + GPT-2-style tokenizer + generation config to `out`; returns `out`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = gpt2_style_tokenizer(digits)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    config = LlamaConfig(vocab_size=(len(tok) + 63) // 64 * 64, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         **{**LLAMA_ARCH, **arch})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # std 0.1 instead of 0.02 for the (tied, LoRA-frozen) embedding, as in finetune/models/tiny.py: at 0.02 a
        # 64-wide model's logits stay below ~1.3 and short trainings could barely move the loss.
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2], pad_token_id=2, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    probe = "Hello  world!\n    12 345 Ünï 日本 <|im_end|>"
    assert AutoTokenizer.from_pretrained(out)(probe)["input_ids"] == tok(probe)["input_ids"], "tokenizer round trip"
    return Path(out)


def tokenizer_kind(folder: Path) -> list[str]:
    """The pre-tokenizer step types of a saved tokenizer.json (what the GGUF export maps to llama.cpp's names)."""
    pre = json.loads((Path(folder) / "tokenizer.json").read_text())["pre_tokenizer"]
    return [s["type"] for s in pre.get("pretokenizers", [pre])]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """The small random Llama (GPT-2 regex tokenizer, like the SmolLM2 folder converted from its GGUF)."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")
