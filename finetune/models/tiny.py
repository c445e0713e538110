"""The embedded default model: a tiny Qwen2-architecture causal LM and its tokenizer, built offline.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here with Qwen2's own pipeline
(NFC, Qwen's split regex, byte-level) and wrapped in `Qwen2Tokenizer`: transformers 5 rebuilds that
pipeline whenever a folder's config says `qwen2`, so a tokenizer trained any other way would encode
differently after a reload. Vocabulary is ~2k tokens instead of Qwen's 151k: with a 151k vocabulary
the embedding and logits would be >95% of this model's compute and the CPU demo would be several
times slower. The special tokens and ChatML template match Qwen2.5, so the same code paths
(end-of-turn `<|im_end|>`, template rendering, masking) run as for the real model.

Weights are random but deterministic (seeded), so the model can be rebuilt identically anywhere;
the build is cached under `<cache>/models/tiny-qwen2-<key>` and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune.paths import DEMO_DATA_DIR, cache_root

BUILDER_VERSION = "2"
BPE_VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5 renders it, minus the default system prompt and the tool-calling branches.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,  # a multiple of 64: bitsandbytes' CPU 4-bit kernels need whole 64-blocks per row
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, like Qwen2.5 (16 query / 2 key-value heads)
    head_dim=32,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.02,
)

# A little always-present text so the vocabulary covers JSON punctuation and chat structure
# even where the demo data files are absent.
_BASE_CORPUS = [
    '{"name": "Ada", "age": 36, "city": "London", "tags": ["a", "b"], "ok": true, "x": null}',
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "system\nuser\nassistant\nYou are a helpful assistant.\n",
]


TOKENIZER_FILES = ("instruct_train.jsonl", "instruct_val.jsonl", "structured_train.jsonl", "structured_val.jsonl")


def _corpus() -> list[str]:
    texts = list(_BASE_CORPUS)
    # Only the tiny model's own demo files: the real-model demo data beside them (extraction_*, chat_*, tools_*)
    # would change this vocabulary, and with it every tokenization the tests and golden losses were made with.
    for path in sorted(DEMO_DATA_DIR / f for f in TOKENIZER_FILES):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    return texts


def _cache_key(corpus: list[str]) -> str:
    h = hashlib.sha256(BUILDER_VERSION.encode())
    h.update(json.dumps(TINY_ARCH, sort_keys=True).encode())
    h.update(CHATML_TEMPLATE.encode())
    for t in corpus:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def _train_tokenizer(corpus: list[str]):
    """Train a byte-level BPE with Qwen2's pre-tokenizer and return a Qwen2Tokenizer."""
    from tokenizers import Tokenizer, trainers
    from transformers import Qwen2Tokenizer

    # Start from Qwen2Tokenizer's own (empty) pipeline so training and reloading agree exactly.
    pipeline = Qwen2Tokenizer()._tokenizer
    raw = Tokenizer.from_str(pipeline.to_str())
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[],
        initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None)
    # Same order as Qwen2.5 (<|endoftext|>, <|im_start|>, <|im_end|>); eos is the end-of-turn token.
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = TINY_ARCH["max_position_embeddings"]
    return tok


def _build(target: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(_corpus())
    vocab = len(tokenizer)
    config = Qwen2Config(
        vocab_size=(vocab + 63) // 64 * 64,  # round up like Qwen does (151,643 -> 151,936)
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **TINY_ARCH,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # The (tied) embeddings are frozen under LoRA and also serve as the output head. At the usual
        # std 0.02 a 128-wide model can reach logits of at most ~2.6, so the loss could barely fall;
        # std 0.1 lets the adapter make confident predictions.
        model.get_input_embeddings().weight.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id], pad_token_id=config.pad_token_id,
        bos_token_id=None, do_sample=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash leaves no half-built model under the real name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tiny_model_dir() -> Path:
    """Return the folder of the embedded tiny model, building it on first use."""
    corpus = _corpus()
    target = cache_root() / "models" / f"tiny-qwen2-{_cache_key(corpus)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _build(target)
        except OSError:
            # Another process built it at the same time and won the rename.
            if not (target / "config.json").is_file():
                raise
    return target


def load_tiny_tokenizer():
    """The embedded tokenizer, loaded the way any model's would be (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir())
