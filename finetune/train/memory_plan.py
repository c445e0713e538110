"""Accelerator memory plan for a LoRA/QLoRA run, from architecture numbers alone (no torch, no download).

`finetune train ... train.plan_only=true` prints `format_plan(plan_from_config(cfg))`. Every term is a byte count
with the rule that produced it written next to it. The activation rules were read off the tensors autograd saves
in a real transformers Qwen2 block with peft LoRA (tests/test_memory_plan.py re-checks them on a tiny model), for
the stack we train with: bitsandbytes base, fp32 adapters, autocast to the compute dtype, norms and biases in
the compute dtype (fp32 with quant.fp32_norms=true, peft's layout) while the frozen embedding table stays in the
checkpoint's 16 bits
(`finetune.models.load.prepare_quantized_base`), and trl's fused loss head, which scores the vocabulary in tiles and
never holds the full logits. For Qwen2.5-3B with 2,048 tokens per micro-batch (nf4, r=16, AdamW,
checkpointing) the plan is 3.4 GiB (3.9 GiB with peft's fp32 norms, 8.1 GiB before the fused loss head and
the 16-bit table); at 8,192 tokens 6.0 GiB, of it 1.1 GiB the bf16 layer inputs checkpointing keeps and 1.4 GiB
the one layer it recomputes at a time (8.0 GiB with fp32 norms, whose residual stream is fp32).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_MODULES + MLP_MODULES  # what peft's "all-linear" picks in a decoder (it skips lm_head)
QUANT_METHODS = ("nf4", "fp4", "int8", "none")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# Optimizer state per trainable parameter. AdamW keeps exp_avg and exp_avg_sq in fp32: 8 B. bitsandbytes 8-bit
# optimizers keep both in 1 B plus an fp32 absmax per 256-value block (8/256 = 0.03 B), but only for tensors of at
# least 4096 values (min_8bit_size); smaller ones stay 32-bit. SGD (transformers' default momentum 0): nothing.
# Paged variants count like the unpaged ones: the state can be evicted to host memory only under pressure.
OPTIMIZER_STATES = {  # name -> (states, bytes per state value; 1 means blockwise 8-bit)
    "adamw_torch": (2, 4), "adamw_torch_fused": (2, 4), "adamw_hf": (2, 4), "adamw_apex_fused": (2, 4),
    "paged_adamw_32bit": (2, 4), "adamw_8bit": (2, 1), "adamw_bnb_8bit": (2, 1), "paged_adamw_8bit": (2, 1),
    "lion_32bit": (1, 4), "paged_lion_32bit": (1, 4), "lion_8bit": (1, 1), "paged_lion_8bit": (1, 1),
    "sgd": (0, 4),
}
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
DQ_BLOCK = 256  # double quant: the 8-bit absmaxes get an fp32 absmax of their own per 256 blocks
OPT8_BLOCK, OPT8_MIN_SIZE = 256, 4096
# trl's fused loss head (trl.trainer.utils.add_fused_lm_head, which SFTTrainer installs) projects at most
# LOSS_TOKEN_TILE tokens onto LOSS_VOCAB_TILE vocabulary columns at a time, keeps per-token fp32 statistics,
# and recomputes the tiles in backward: the (tokens x vocab) logits never exist.
LOSS_TOKEN_TILE, LOSS_VOCAB_TILE = 4096, 32768
LOSS_TOKEN_STATS = 8  # fp32 values per token it keeps (running max, sums, target logit, log-normaliser, ...)
FRAGMENTATION = 0.05  # caching-allocator rounding and fragmentation, a rule of thumb until the GPU bench says more

Targets = str | Sequence[str]


@dataclass
class MemoryPlan:
    """Estimated accelerator memory of one training step, in bytes, with the assumptions used in `notes`."""

    weights: int  # frozen base: quantized linears + their constants + unquantized embeddings/norms/biases
    lora_params: int  # trainable adapter weights (fp32)
    gradients: int  # fp32 grads of the adapter weights
    optimizer: int  # optimizer state of the adapter weights
    activations: int  # the one below that `gradient_checkpointing` selects
    activations_no_ckpt: int
    activations_ckpt: int
    overhead: int  # dequantization buffers + allocator fragmentation, for the selected mode
    total: int  # weights + lora_params + gradients + optimizer + activations + overhead
    overhead_no_ckpt: int = 0
    overhead_ckpt: int = 0
    total_no_ckpt: int = 0
    total_ckpt: int = 0
    base_params: int = 0
    lora_param_count: int = 0
    tokens_per_step: int = 0
    gradient_checkpointing: bool = True
    detail: dict[str, int] = field(default_factory=dict)  # sub-terms in bytes (and a few per-token figures)
    inputs: dict[str, Any] = field(default_factory=dict)  # the arguments the plan was made from
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Arch:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


def _arch(arch: Mapping[str, Any]) -> _Arch:
    """Normalize a HF-config-shaped dict; ValueError names the missing or bad key."""
    if not isinstance(arch, Mapping):  # ValueError like every other bad config value: callers report those
        raise ValueError(f"model.architecture must be a mapping of architecture numbers, got {type(arch).__name__}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if arch.get(key) is None:
            raise ValueError(f"model.architecture is missing {key!r}: copy it from the model's config.json")
    heads = arch["num_attention_heads"]
    num = {k: arch.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    num["num_attention_heads"] = heads
    num["num_key_value_heads"] = arch.get("num_key_value_heads") or heads  # HF default: no GQA
    num["head_dim"] = arch.get("head_dim") or (arch["hidden_size"] // heads if isinstance(heads, int) and heads else 0)
    for key, value in num.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model.architecture.{key}={value!r}: must be a positive integer")
    if num["num_attention_heads"] % num["num_key_value_heads"]:
        raise ValueError(f"model.architecture.num_key_value_heads={num['num_key_value_heads']} must divide "
                         f"num_attention_heads={heads}")
    attention_bias = bool(arch.get("attention_bias", False))  # Llama-style: bias on q, k, v and o
    qkv_bias = arch.get("qkv_bias")
    if qkv_bias is None:  # Qwen2 hard-codes a q/k/v bias and has no config key for it
        qkv_bias = attention_bias or arch.get("model_type") == "qwen2"
    return _Arch(num["hidden_size"], num["intermediate_size"], num["num_hidden_layers"], heads,
                 num["num_key_value_heads"], num["head_dim"], num["vocab_size"],
                 bool(arch.get("tie_word_embeddings", False)), bool(qkv_bias), attention_bias,
                 bool(arch.get("mlp_bias", False)))


def _linears(a: _Arch) -> dict[str, tuple[int, int, bool]]:
    """(in_features, out_features, has_bias) of each linear in one decoder layer."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {"q_proj": (a.hidden, q, a.qkv_bias), "k_proj": (a.hidden, kv, a.qkv_bias),
            "v_proj": (a.hidden, kv, a.qkv_bias), "o_proj": (q, a.hidden, a.o_bias),
            "gate_proj": (a.hidden, a.inter, a.mlp_bias), "up_proj": (a.hidden, a.inter, a.mlp_bias),
            "down_proj": (a.inter, a.hidden, a.mlp_bias)}


def count_parameters(arch: Mapping[str, Any]) -> dict[str, int]:
    """Base parameters by kind: embed, attn, mlp, norm, lm_head (0 when tied) and total.

    Raises:
        ValueError: a required key is missing or not a positive integer (the key is named).
    """
    a = _arch(arch)
    per_layer = {name: i * o + (o if bias else 0) for name, (i, o, bias) in _linears(a).items()}
    out = {"embed": a.vocab * a.hidden,
           "attn": a.layers * sum(per_layer[m] for m in ATTN_MODULES),
           "mlp": a.layers * sum(per_layer[m] for m in MLP_MODULES),
           "norm": (2 * a.layers + 1) * a.hidden,  # input + post-attention RMSNorm per layer, one final norm
           "lm_head": 0 if a.tied else a.vocab * a.hidden}
    out["total"] = sum(out.values())
    return out


def _lora_targets(target_modules: Targets) -> list[str]:
    if target_modules == "all-linear":
        return list(LINEAR_MODULES)
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"peft.target_modules={target_modules!r}: use 'all-linear' or a list such as "
                         f"[q_proj, v_proj]; regex patterns are not planned")
    unknown = [t for t in target_modules if t.split(".")[-1] not in LINEAR_MODULES + ("lm_head",)]
    if unknown:
        raise ValueError(f"peft.target_modules has {unknown}: the plan knows {', '.join(LINEAR_MODULES)} and lm_head")
    return sorted({t.split(".")[-1] for t in target_modules})


def _lora_tensor_sizes(a: _Arch, r: int, targets: list[str]) -> list[int]:
    """Element counts of every LoRA A (r x in) and B (out x r) matrix."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"peft.r={r!r}: the LoRA rank must be a positive integer (try 16)")
    shapes = [(i, o) for name, (i, o, _) in _linears(a).items() if name in targets] * a.layers
    if "lm_head" in targets:
        shapes.append((a.hidden, a.vocab))
    return [n for i, o in shapes for n in (r * i, o * r)]


def lora_parameter_count(arch: Mapping[str, Any], r: int, target_modules: Targets) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted linear per layer (bias='none').

    Raises:
        ValueError: r <= 0, an unknown target module, or a bad architecture key.
    """
    return sum(_lora_tensor_sizes(_arch(arch), r, _lora_targets(target_modules)))


def _weight_bytes(a: _Arch, quant: str, double_quant: bool, c: int, unq: int, emb: int) -> dict[str, int]:
    """Frozen base weights. bitsandbytes quantizes only the decoder linears; transformers keeps lm_head (and the
    tied embedding) out of it, embeddings and norms are not Linear, biases stay in their own dtype. `unq` is the
    byte width of norms and biases (4 on a prepared quantized base, else the compute dtype), `emb` that of the
    embedding tables."""
    packed = consts = 0
    for i, o, _ in _linears(a).values():
        n = i * o
        if quant in ("nf4", "fp4"):
            blocks = math.ceil(n / NF4_BLOCK)
            packed += math.ceil(n / 2)  # 4 bit = 0.5 B per weight
            # absmax per 64 weights: fp32 (4 B = 0.5 bit/weight), or with double quant 1 B plus an fp32 absmax per
            # 256 blocks plus an fp32 offset: 8/64 + 32/16384 = 0.127 bit/weight
            consts += blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 if double_quant else 4 * blocks
        elif quant == "int8":
            packed += n  # LLM.int8: 1 B per weight plus an fp32 scale per output row
            consts += 4 * o
        else:
            packed += c * n
    biases = sum(o for _, o, bias in _linears(a).values() if bias) * a.layers
    return {"quantized_linears": packed * a.layers, "quant_constants": consts * a.layers,
            "embeddings": emb * a.vocab * a.hidden * (1 if a.tied else 2),
            "norms_and_biases": unq * ((2 * a.layers + 1) * a.hidden + biases)}


def _optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"train.optim={optimizer!r}: the plan knows {', '.join(sorted(OPTIMIZER_STATES))}")
    states, width = OPTIMIZER_STATES[optimizer]
    total = 0
    for n in sizes:
        if width == 1 and n >= OPT8_MIN_SIZE:
            total += states * (n + 4 * math.ceil(n / OPT8_BLOCK))
        else:
            total += states * 4 * n
    return total


def _layer_bytes_per_token(a: _Arch, targets: list[str], r: int, c: int, s: int, quant: str,
                           dropout: float, attn: str, attn_len: int) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward per token (c: compute, s: residual-stream dtype width,
    attn_len: keys each query's mask row spans -- the whole flattened micro-batch when padding-free)."""
    h, i, q = a.hidden, a.inter, a.heads * a.head_dim
    o = s if quant != "none" else c  # bnb Linear4bit/8bitLt cast their output back to the input's dtype
    # RMSNorm upcasts its input to fp32 and keeps it plus 1/rms: (4h + 4) B, twice per layer.
    norms = 2 * (4 * h + 4)
    # flash-attn and sdpa (flash / mem-efficient kernels) keep q, k, v, out in the compute dtype plus an fp32
    # logsumexp per head. sdpa with a packing mask: transformers repeats k/v to all query heads first (no native GQA)
    # and torch turns the bool mask into a compute-dtype bias that each layer keeps: attn_len * c per token.
    kv_heads = a.heads if attn in ("sdpa", "eager") else a.kv_heads
    core = c * (q + 2 * kv_heads * a.head_dim)
    if attn == "eager":  # fp32 softmax probs (kept by softmax) and, below fp32, their copy kept by probs @ v
        core += a.heads * attn_len * (4 + (c if c < 4 else 0))
    else:
        core += c * q + 4 * a.heads + (attn_len * c if attn == "sdpa" else 0)
    # SwiGLU: silu keeps the gate output, the product keeps silu(gate) and up: 3 x i in the base linears' dtype.
    mlp = 3 * o * i
    # LoRA: frozen base linears keep nothing (their input grad needs only W), the adapter keeps its input.
    # peft casts that input to the fp32 adapter dtype and autocast casts it back, so under bf16 every adapted
    # module holds its own c-byte copy; with dropout each also holds a 1 B mask (CUDA's fused dropout). In plain
    # fp32 without dropout the modules sharing an input share one copy, and o_proj's input is the attention out.
    lora_in = 0
    for width, group in ((h, ("q_proj", "k_proj", "v_proj")), (q, ("o_proj",)),
                         (h, ("gate_proj", "up_proj")), (i, ("down_proj",))):
        hit = [m for m in group if m in targets]
        if dropout > 0:
            lora_in += len(hit) * width * (c + 1)
        elif c < 4:
            lora_in += len(hit) * width * c
        elif hit and not (group == ("o_proj",) and attn != "eager"):  # fused attention already keeps its out
            lora_in += width * 4
    lora_mid = sum(1 for m in LINEAR_MODULES if m in targets) * r * c  # lora_B keeps lora_A's output
    # LLM.int8 keeps each quantized linear's input for its backward (upper bound: counted even when shared).
    int8_inputs = s * (2 * h + q + i) if quant == "int8" else 0
    return {"norms": norms, "attention": core, "mlp": mlp, "lora_inputs": lora_in + lora_mid, "int8_inputs": int8_inputs}


def plan_memory(arch: Mapping[str, Any], *, quant_method: str, double_quant: bool, compute_dtype: str, r: int,
                target_modules: Targets, optimizer: str, seq_len: int, micro_batch: int,
                gradient_checkpointing: bool, lora_dropout: float = 0.05, attn_implementation: str = "sdpa",
                padding_free: bool = True, upcast_non_quantized: bool | None = None,
                embedding_dtype: str | None = None) -> MemoryPlan:
    """Estimate the accelerator memory of one training step.

    Args:
        arch: HF-config-shaped numbers (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim, vocab_size, tie_word_embeddings, qkv_bias / attention_bias).
        seq_len, micro_batch: tokens per row (data.max_length) and rows per micro-batch.
        padding_free: trl's bfd packing flattens the micro-batch into one row of seq_len * micro_batch tokens,
            so sdpa/eager masks span all of them; False = padded rows of seq_len.
        upcast_non_quantized: None = True on a quantized base (norms and biases cast to fp32, the residual stream
            fp32), False on an unquantized one.
        embedding_dtype: dtype of the embedding tables; None = bfloat16 on a quantized base (kept as the 16-bit
            checkpoint stores them; "float32" under FSDP/DeepSpeed or for an fp32 checkpoint), else the compute
            dtype.
    Raises:
        ValueError: naming the bad argument or architecture key.
    """
    a = _arch(arch)
    targets = _lora_targets(target_modules)
    lora_sizes = _lora_tensor_sizes(a, r, targets)
    if quant_method not in QUANT_METHODS:
        raise ValueError(f"quant.method={quant_method!r}: use one of {', '.join(QUANT_METHODS)}")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"quant.compute_dtype={compute_dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation={attn_implementation!r}: use {', '.join(ATTN_IMPLEMENTATIONS)}")
    for key, value in (("seq_len", seq_len), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key}={value!r}: must be a positive integer")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"peft.lora_dropout={lora_dropout}: must be in [0, 1)")
    c = DTYPE_BYTES[compute_dtype]
    upcast = quant_method != "none" if upcast_non_quantized is None else upcast_non_quantized
    s = 4 if upcast else c  # residual stream: the (widened) embedding output keeps its dtype through the adds
    if embedding_dtype is None:
        embedding_dtype = "bfloat16" if quant_method != "none" else compute_dtype
    if embedding_dtype not in DTYPE_BYTES:
        raise ValueError(f"embedding_dtype={embedding_dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    e = DTYPE_BYTES[embedding_dtype]
    tokens = seq_len * micro_batch

    w = _weight_bytes(a, quant_method, double_quant, c, s, e)
    n_lora = sum(lora_sizes)
    lora_bytes, grads = 4 * n_lora, 4 * n_lora  # peft autocasts adapters to fp32; their grads are fp32 too
    optim = _optimizer_bytes(lora_sizes, optimizer)

    rows, attn_len = (1, tokens) if padding_free else (micro_batch, seq_len)
    per_tok = _layer_bytes_per_token(a, targets, r, c, s, quant_method, lora_dropout, attn_implementation, attn_len)
    layer = sum(per_tok.values()) * tokens
    final_norm = (4 * a.hidden + 4) * tokens
    # Autocast copies of fp32 weights live until backward: every LoRA matrix (the fused loss head casts the output
    # head tile by tile, see loss_peak). The sdpa/eager mask is one bool per (query, key) pair per row.
    lora_copies = n_lora * c if c < 4 else 0
    mask = rows * attn_len * attn_len if attn_implementation != "flash_attention_2" else 0
    # Fused loss head at its backward peak: one logits tile in the compute dtype, the head's weight tile cast to
    # it (when stored wider or narrower), the hidden-state tile cast to it, the fp32 gradient of all hidden
    # states it accumulates, and its per-token statistics.
    n_tile, v_tile = min(tokens, LOSS_TOKEN_TILE), min(a.vocab, LOSS_VOCAB_TILE)
    loss_peak = (n_tile * v_tile * c + (v_tile * a.hidden * c if e != c else 0)
                 + (n_tile * a.hidden * c if s != c else 0) + 4 * tokens * a.hidden + 4 * LOSS_TOKEN_STATS * tokens)
    mlp_backward = (2 * (s if quant_method != "none" else c) * a.inter + 12 * a.hidden) * tokens  # MLP grads
    fixed = final_norm + lora_copies + mask
    act_no = a.layers * layer + fixed + max(loss_peak, mlp_backward)
    # Checkpointing keeps each layer's input (h*s per token) and recomputes one layer at a time in backward.
    ckpt_inputs = a.layers * a.hidden * s * tokens
    act_ck = ckpt_inputs + fixed + max(loss_peak, layer + mlp_backward)

    # bnb dequantizes a whole weight to the compute dtype for every matmul over many tokens and again in backward.
    dequant = 2 * c * max(i * o for i, o, _ in _linears(a).values()) if quant_method != "none" else 0
    static = sum(w.values()) + lora_bytes + grads + optim

    def overhead(act: int) -> int:
        return dequant + int(FRAGMENTATION * (static + act))

    tot_no, tot_ck = static + act_no + overhead(act_no), static + act_ck + overhead(act_ck)
    notes = [
        f"weights: {quant_method}{' + double quant' if double_quant and quant_method in ('nf4', 'fp4') else ''} "
        f"decoder linears; embeddings in {e * 8}-bit, norms and biases in {s * 8}-bit",
        f"LoRA r={r} on {', '.join(targets)}: {n_lora:,} fp32 params, fp32 grads, {optimizer} state",
        (f"activations: {compute_dtype} compute, {attn_implementation} attention, lora_dropout={lora_dropout}; "
         f"fused loss head in tiles of {n_tile} tokens x {v_tile} of {a.vocab} vocab: {loss_peak / GIB:.2f} GiB"),
        "not counted: CUDA context (~0.5 GiB, outside torch.cuda.max_memory_allocated), trl metric temporaries",
    ]
    detail = {**w, "ckpt_inputs": ckpt_inputs, "layer_activations": layer, "loss_peak": loss_peak,
              "lora_autocast_copies": lora_copies, "attention_mask": mask,
              "final_norm": final_norm, "dequant_buffers": dequant,
              **{f"per_token_layer_{k}": v for k, v in per_tok.items()}}
    inputs = dict(quant_method=quant_method, double_quant=double_quant, compute_dtype=compute_dtype, r=r,
                  target_modules=target_modules, optimizer=optimizer, seq_len=seq_len, micro_batch=micro_batch,
                  gradient_checkpointing=gradient_checkpointing, lora_dropout=lora_dropout,
                  attn_implementation=attn_implementation, padding_free=padding_free, upcast_non_quantized=upcast,
                  embedding_dtype=embedding_dtype)
    act = act_ck if gradient_checkpointing else act_no
    return MemoryPlan(
        weights=sum(w.values()), lora_params=lora_bytes, gradients=grads, optimizer=optim, activations=act,
        activations_no_ckpt=act_no, activations_ckpt=act_ck, overhead=overhead(act),
        total=tot_ck if gradient_checkpointing else tot_no, overhead_no_ckpt=overhead(act_no),
        overhead_ckpt=overhead(act_ck), total_no_ckpt=tot_no, total_ckpt=tot_ck,
        base_params=count_parameters(arch)["total"], lora_param_count=n_lora, tokens_per_step=tokens,
        gradient_checkpointing=gradient_checkpointing, detail=detail, inputs=inputs, notes=notes)


def plan_from_config(cfg: Any) -> MemoryPlan:
    """The plan for a validated FinetuneConfig, as `train.plan_only=true` prints it (accelerator: bf16 compute)."""
    if not cfg.model.architecture:
        raise ValueError(f"model.architecture is not set for {cfg.model.name_or_path!r}: add the numbers from its "
                         "config.json (hidden_size, num_hidden_layers, ...) to the model config")
    compute = "bfloat16" if cfg.quant.compute_dtype == "auto" else cfg.quant.compute_dtype
    ckpt = cfg.train.gradient_checkpointing
    return plan_memory(
        dict(cfg.model.architecture), quant_method=cfg.quant.method, double_quant=cfg.quant.double_quant,
        compute_dtype=compute, r=cfg.peft.r, target_modules=cfg.peft.target_modules, optimizer=cfg.train.optim,
        seq_len=cfg.data.max_length, micro_batch=cfg.train.per_device_train_batch_size,
        gradient_checkpointing=cfg.quant.is_quantized if ckpt is None else ckpt, lora_dropout=cfg.peft.lora_dropout,
        padding_free=cfg.train.packing, upcast_non_quantized=cfg.quant.is_quantized and cfg.quant.fp32_norms,
        attn_implementation=cfg.model.attn_implementation if cfg.model.attn_implementation in ATTN_IMPLEMENTATIONS
        else "sdpa")


def format_plan(plan: MemoryPlan) -> str:
    """A small table in GiB with and without gradient checkpointing; the selected column is marked."""
    sel = "ckpt" if plan.gradient_checkpointing else "no ckpt"
    rows = [("weights (frozen base)", plan.weights, plan.weights), ("LoRA params", plan.lora_params, plan.lora_params),
            ("gradients", plan.gradients, plan.gradients), ("optimizer state", plan.optimizer, plan.optimizer),
            ("activations", plan.activations_no_ckpt, plan.activations_ckpt),
            ("overhead", plan.overhead_no_ckpt, plan.overhead_ckpt), ("total", plan.total_no_ckpt, plan.total_ckpt)]
    lines = [(f"memory plan: {plan.base_params / 1e9:.2f} B base params, {plan.lora_param_count / 1e6:.1f} M LoRA "
              f"params, {plan.tokens_per_step} tokens per micro-batch (selected: {sel})"),
             f"{'':24s}{'no ckpt':>10s}{'ckpt':>10s}   GiB"]
    lines += [f"{name:24s}{no / GIB:10.2f}{ck / GIB:10.2f}" for name, no, ck in rows]
    lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
