"""GGUF writing with the `gguf` package: plan (every check, nothing written), then stream tensor by tensor.

Why not llama.cpp's convert_hf_to_gguf.py: it is a script in the llama.cpp repository, not a library (the
`gguf` package does not ship it), and it recognises a BPE pre-tokenizer by hashing how the tokenizer splits
a test string, so any vocabulary it has not seen (our embedded model's, any retrained one) stops it at the
end. Here the pre-tokenizer is recognised by its definition (the split regex in tokenizer.json), and the
file is written with the package's GGUFWriter, tensor-name map, SpecialVocab (merges, special ids) and
Python quantizers, following the converter's conventions (noted where they apply).

Architectures: Qwen2 (qwen2 graph, NeoX rotary: tensors as stored) and Llama (llama graph, e.g. SmolLM2: q/k rows
permuted to llama.cpp's adjacent rotary pairs, see `rope_pairs`); tied embeddings write no output tensor.

`plan_gguf` reads only config.json, the tokenizer and the safetensors headers and raises a FinetuneError
for anything this exporter cannot write faithfully (architecture, rope scaling, sliding window, tokenizer,
missing or extra tensors). `write_gguf` then holds one tensor at a time: the largest of Qwen2.5-3B, the
151,936 x 2048 embedding, is 1.2 GB in fp32.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.distributed import progress
from finetune.errors import FinetuneError
from finetune.merge.shards import weight_files

log = logging.getLogger("finetune.export.run")

# How tokenizer.json splits text before BPE, as a tuple of stages -> llama.cpp's pre-tokenizer name (the
# `tokenizer.ggml.pre` values llama-vocab.cpp maps to the same split; llama.cpp 0.3.36's vendored source).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
GPT2_SPLIT = "ByteLevel(use_regex=true)"  # the GPT-2 regex built into the ByteLevel pre-tokenizer
DIGITS_SPLIT = "Digits(individual_digits=true)"
PRE_TOKENIZERS = {
    (QWEN2_SPLIT,): "qwen2",  # llama.cpp keeps the same regex, rewritten without the (?i:) group
    (GPT2_SPLIT,): "gpt-2",  # GPT-2's regex alone (the SmolLM2 folder converted from its GGUF by transformers)
    # Each digit apart, then GPT-2's regex: SmolLM's tokenizer.json (llama.cpp also uses it for starcoder & co.)
    (DIGITS_SPLIT, GPT2_SPLIT): "smollm",
}


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    block_tensors: Any  # config -> GGUF names per block, without the "blk.N." prefix
    check: Any  # config -> list of problems this exporter cannot write
    # llama.cpp's llama graph rotates pairs of adjacent values (Meta's layout); HF Llama checkpoints are stored
    # for rotate_half (pairs i, i + head_dim/2), so q/k rows are permuted back, as convert_hf_to_gguf.py does.
    # Qwen2's graph uses the NeoX rotation, HF's own: no permutation.
    rope_pairs: bool = False


def _rope_problems(config) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return [f"rope scaling {rope.get('rope_type')!r} is not written by this exporter (only plain RoPE)"]
    return []


def _qwen2_problems(config) -> list[str]:
    out = _rope_problems(config)
    if getattr(config, "use_sliding_window", False):
        out.append("use_sliding_window=true: llama.cpp's qwen2 graph has no sliding-window attention")
    return out


def _qwen2_blocks(config) -> tuple[str, ...]:
    return ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight",
            "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
            "ffn_down.weight")


def _llama_blocks(config) -> tuple[str, ...]:
    # llama.cpp's llama graph takes q/k/v/o and gate/up/down biases when present (TENSOR_NOT_REQUIRED)
    attn = ("attn_q", "attn_k", "attn_v", "attn_output")
    ffn = ("ffn_gate", "ffn_up", "ffn_down")
    names = ["attn_norm.weight", "ffn_norm.weight", *(f"{t}.weight" for t in attn + ffn)]
    names += [f"{t}.bias" for t in attn] if getattr(config, "attention_bias", False) else []
    names += [f"{t}.bias" for t in ffn] if getattr(config, "mlp_bias", False) else []
    return tuple(names)


# The architectures whose conversion is tested end to end (llama.cpp greedy output == transformers').
ARCHITECTURES = {
    "Qwen2ForCausalLM": ArchSpec("QWEN2", _qwen2_blocks, _qwen2_problems),
    "LlamaForCausalLM": ArchSpec("LLAMA", _llama_blocks, _rope_problems, rope_pairs=True),
}

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


@dataclass
class TensorPlan:
    source: str  # safetensors tensor name
    file: Path
    name: str  # GGUF tensor name
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    rope_heads: int = 0  # > 0: q/k rows permuted to adjacent rotary pairs over this many heads (ArchSpec.rope_pairs)


@dataclass
class GGUFPlan:
    model_dir: Path
    arch: ArchSpec
    config: Any  # transformers PretrainedConfig
    tokenizer: Any
    quant: str
    tensors: list[TensorPlan] = field(default_factory=list)
    pre_tokenizer: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise FinetuneError("GGUF export needs the `gguf` package: pip install 'finetune[export]' "
                            "(or pip install gguf)") from None
    return gguf


def check_architecture(model_dir: Path):
    """Config of `model_dir` and its ArchSpec; FinetuneError when the architecture cannot be exported."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise FinetuneError(f"{model_dir}: no config.json; export needs a merged model folder "
                            "(run `finetune merge run=...` first, or point export.model= at one)")
    archs = json.loads(path.read_text(encoding="utf-8")).get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    spec = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if spec is None:
        raise FinetuneError(f"{path}: architecture {archs or 'unknown'} is not supported by the GGUF export "
                            f"(supported: {supported}); nothing was written. For other architectures use "
                            "llama.cpp's convert_hf_to_gguf.py on the merged folder")
    config = AutoConfig.from_pretrained(model_dir)
    problems = spec.check(config)
    if getattr(config, "quantization_config", None):
        problems.append("the weights are saved quantized (quantization_config in config.json); "
                        "merge into 16/32-bit weights (merge.base=original) before exporting")
    if problems:
        raise FinetuneError(f"{path}: cannot export to GGUF: " + "; ".join(problems) + "; nothing was written")
    return config, spec


def check_tokenizer(model_dir: Path):
    """The tokenizer transformers loads for `model_dir` and llama.cpp's name for its pre-tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre, dec = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    where = f"{model_dir}/tokenizer.json"
    if model.get("type") != "BPE" or model.get("byte_fallback") or dec.get("type") != "ByteLevel":
        raise FinetuneError(f"{where}: the GGUF export writes byte-level BPE tokenizers (GPT-2 style, as Qwen2's and "
                            f"SmolLM2's); this one is {model.get('type')!r} with decoder {dec.get('type')!r}; "
                            "nothing was written")
    stages, problem = _split_stages(pre)
    name = PRE_TOKENIZERS.get(stages)
    if problem or name is None:
        what = problem or (f"split {' then '.join(stages)}" if stages else "that does not split")
        raise FinetuneError(f"{where}: pre-tokenizer {what} has no llama.cpp "
                            f"equivalent known to this exporter (known: those of llama.cpp's "
                            f"{', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently, so "
                            "nothing was written")
    return tok, name


def _split_stages(pre: dict) -> tuple[tuple[str, ...], str]:
    """The splitting steps of a tokenizer.json pre_tokenizer, in order, and what is wrong with it ('' if nothing)."""
    stages, byte_level = [], False
    for step in pre.get("pretokenizers", [pre]) if pre else []:
        kind = step.get("type")
        if kind == "Split" and "Regex" in (step.get("pattern") or {}) and step.get("behavior") in (None, "Isolated") \
                and not step.get("invert"):
            stages.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step.get("individual_digits"):
            stages.append(DIGITS_SPLIT)
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):  # llama.cpp's BPE never adds a leading space
                return (), "ByteLevel with add_prefix_space=true"
            byte_level = True
            stages += [GPT2_SPLIT] if step.get("use_regex", True) else []
        else:
            return (), f"step {kind!r} ({json.dumps(step)[:80]})"
    return tuple(stages), "" if byte_level else "without a ByteLevel step"


def _tensor_type(gguf, name: str, shape: tuple[int, ...], quant: str):
    """Type of one tensor, as convert_hf_to_gguf.py picks it."""
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):  # llama.cpp's kernels take 1-D tensors in f32 only
        return Q.F32
    qtype = Q[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:  # rows must split into whole blocks (32 values for q8_0 / q4_0 / q5_x)
        log.info("%s: rows of %d values do not split into %d-blocks; stored as f16", name, shape[-1], block)
        return Q.F16
    return qtype


def plan_gguf(model_dir: Path, quant: str) -> GGUFPlan:
    """Check that `model_dir` can be written as GGUF and list every output tensor; nothing is written."""
    from safetensors import safe_open

    gguf = _import_gguf()
    model_dir = Path(model_dir)
    config, spec = check_architecture(model_dir)
    tokenizer, pre = check_tokenizer(model_dir)
    plan = GGUFPlan(model_dir, spec, config, tokenizer, quant, pre_tokenizer=pre)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.gguf_arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    unknown = []
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same matrix as the embedding
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    unknown.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                qtype = _tensor_type(gguf, new, shape, quant)
                nbytes = int(math.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
                heads = _rope_heads(config, new) if spec.rope_pairs else 0
                plan.tensors.append(TensorPlan(key, file, new, shape, qtype, nbytes, heads))
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    expected |= {f"blk.{i}.{t}" for i in range(config.num_hidden_layers) for t in spec.block_tensors(config)}
    got = {t.name for t in plan.tensors}
    problems = [f"tensors with no GGUF name: {', '.join(unknown[:5])}"] if unknown else []
    if expected - got:
        problems.append(f"missing tensors: {', '.join(sorted(expected - got)[:5])}")
    if got - expected:
        problems.append(f"tensors llama.cpp's {spec.gguf_arch.lower()} graph would not use: "
                        f"{', '.join(sorted(got - expected)[:5])}")
    if problems:
        raise FinetuneError(f"{model_dir}: cannot export to GGUF: {'; '.join(problems)}; nothing was written")
    return plan


def _rope_heads(config, gguf_name: str) -> int:
    """Heads whose rows a q/k tensor holds (key/value heads for k under GQA); 0 for every other tensor."""
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return config.num_attention_heads
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return config.num_key_value_heads
    return 0


def rope_pairs(data, n_head: int):
    """Rows of a q/k projection, per head, from rotate_half order (x_i pairs with x_(i+d/2), HF) to adjacent
    pairs (x_2i with x_2i+1, what llama.cpp's llama graph rotates). Works on weights (rows x in) and biases."""
    rows = data.shape[0]
    return data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _token_table(gguf, tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1 (unused embedding rows become [PADi], as the converter does)."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise FinetuneError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _write_metadata(gguf, writer, plan: GGUFPlan, name: str) -> None:
    c, tok = plan.config, plan.tokenizer
    params = sum(int(math.prod(t.shape)) for t in plan.tensors)
    meta = gguf.Metadata.load(None, plan.model_dir, name, params)  # model card, generation_config sampling
    meta.name = name
    meta.size_label = meta.size_label or gguf.size_label(params, 0, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float((c.rope_parameters or {}).get("rope_theta", 10000.0)))
    if plan.arch.rope_pairs:  # keys convert_hf_to_gguf.py writes for llama (llama.cpp derives both otherwise)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(next(t.shape[0] for t in plan.tensors if t.name == "token_embd.weight"))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[plan.quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = next(t.shape[0] for t in plan.tensors if t.name == "token_embd.weight")
    tokens, types = _token_table(gguf, tok, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(plan.model_dir, load_merges=True, n_vocab=n_vocab)  # merges + bos/eos/pad ids
    # Say explicitly whether BOS/EOS are added (transformers' tokenizer decides, e.g. Qwen2 adds neither):
    # llama.cpp's default for a missing key depends on the pre-tokenizer.
    ids = tok("a")["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    special.chat_template = tok.chat_template  # the template transformers uses (training's, by the run contract)
    special.add_to_gguf(writer, quiet=True)


def write_gguf(plan: GGUFPlan, path: Path, name: str) -> dict:
    """Write `plan` to `path`, one tensor in memory at a time; returns what llama.cpp will see it as."""
    import numpy as np
    from safetensors import safe_open

    gguf = _import_gguf()
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[plan.arch.gguf_arch]])
    _write_metadata(gguf, writer, plan, name)
    for t in plan.tensors:
        # dtype float32 + raw_dtype: the writer records the logical shape and our byte count as given.
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in {t.file for t in plan.tensors}}
            for t in progress(plan.tensors, desc=f"write GGUF {plan.quant}", unit="tensor"):
                data = handles[t.file].get_tensor(t.source).float().numpy()
                if t.rope_heads:
                    data = rope_pairs(data, t.rope_heads)
                writer.write_tensor_data(gguf.quants.quantize(data, t.qtype))
    finally:
        writer.close()
    return {"architecture": plan.arch.gguf_arch.lower(), "pre_tokenizer": plan.pre_tokenizer}


def file_summary(path: Path) -> dict:
    """Size and tensor types of a written GGUF file, read back from its header."""
    gguf = _import_gguf()
    counts: dict[str, int] = {}
    tensors = gguf.GGUFReader(path).tensors
    for t in tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"bytes": Path(path).stat().st_size, "tensors": len(tensors), "tensor_types": counts}


def quantize_with_llama_cpp(src: Path, dst: Path, quant: str) -> None:
    """k-quants: llama.cpp's own quantizer (what its llama-quantize tool runs) turns the f16 file `src` into `dst`.

    Its per-tensor choices are kept as llama.cpp makes them (e.g. q4_k_m keeps some ffn_down/attn_v in q6_k,
    and a matrix whose rows do not split into 256-value super-blocks gets a fallback type).
    """
    import llama_cpp

    gguf = _import_gguf()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise FinetuneError(f"llama.cpp could not quantize {src.name} to {quant} (its log above says why)")
