"""Per-document attention for packed rows, on top of torch's scaled_dot_product_attention.

trl's padding-free packing puts several documents into one row and marks them by position ids that restart at
0. With `sdpa`, transformers then builds a (row x row) block-diagonal mask and sdpa computes every score of the
row, masked or not: for a 2,048-token row of ten 200-token documents that is about ten times the attention work
that matters, and with an explicit mask torch's CPU kernel also keeps the whole score matrix for backward.

`sdpa_packed` (model.attn_implementation=sdpa_packed, registered with transformers' AttentionInterface) reads the
document boundaries from the position ids and runs sdpa once per document with `is_causal=True` (no mask built
into the kernel, flash-style kernel on CPU). Rows without restarts (generation, evaluation, unpacked batches)
go to transformers' own sdpa unchanged, with the mask they come with. A document that starts at position P > 0
shares its first P tokens with the last document before it that starts at 0 (shared-prefix packing cut them:
finetune.train.shared_prefix, and eval's packed prefill): it attends to that document's keys and values at
positions 0..P-1, then causally to its own. The outputs are those of sdpa with the block mask (tests/models/test_attention.py compares them and their gradients); the measured speed is in
configs/model/smollm2_135m_instruct.yaml and benchmarks/train_throughput.py.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

log = logging.getLogger("finetune.models.attention")

NAME = "sdpa_packed"
# torch's CPU flash-attention backward is slow in bf16: profiled on the demo step (SmolLM2-135M nf4, one
# 2,048-token row of 14 documents, 9 query / 3 key-value heads of 64, AMX Xeon, 2 cores) it took 1.19 of the
# step's 4.54 s, nine times its forward. The same documents with q, k, v cast to fp32 around sdpa ran
# 7.3 + 24.5 ms per layer (forward + backward, casts included) against 4.0 + 45.8 ms in bf16; the whole step
# 3.96 -> 3.42 s (10 steps each, same rows). CPUs differ, so the choice is measured (`fp32_backward_faster`).
# The gain depends on the lengths: one document's forward+backward, fp32 against bf16, won 2.7x at 64 tokens,
# 1.6-1.7x at 128 and 160 but tied at 192 and lost at 256 (0.92x) and 400 (0.82x); lengths a multiple of 64 suit
# the bf16 kernel's blocks. So the probe runs on documents of the lengths the row has (PROBE_DOCS of them), and
# the choice is kept per mean length rounded up to PROBE_STEP tokens.
PROBE_STEP = 64
PROBE_DOCS = 4
PROBE_REPEATS = 5
PROBE_MARGIN = 1.1  # fp32 must win by this much; a near tie keeps the compute dtype


def document_bounds(position_ids, cu_seq_lens=None) -> list[tuple[int, int]] | None:
    """[(start, end), ...] of the documents in a single packed row: the cumulative lengths trl's padding-free
    collator passes (`cu_seq_lens_q`), else from position ids that do not go on by one (a restart at 0, or at P
    for a document that shares P tokens: finetune.train.shared_prefix); None when there is more than
    one row or the row is one document (nothing to split)."""
    if cu_seq_lens is not None and position_ids is not None and position_ids.shape[0] == 1:
        edges = [int(x) for x in cu_seq_lens.tolist()]
        if len(edges) > 2 and edges[0] == 0 and edges[-1] == position_ids.shape[1]:
            return list(zip(edges[:-1], edges[1:]))
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    pos = position_ids[0]
    starts = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()
    if not starts:
        return None
    edges = [0, *starts, int(pos.shape[0])]
    return list(zip(edges[:-1], edges[1:]))


# Shorter common prefixes are left alone: each shared document costs one masked sdpa call per layer instead of a
# causal one, which is worth it only for more than a few tokens.
MIN_SHARED = 8


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_shared_prefixes(docs: list[list[int]], first_labels: list[int], min_shared: int = MIN_SHARED):
    """Which documents of a packed row take their leading tokens from an earlier one (the layout sdpa_packed
    reads: a document starting at position P attends to the last document before it that starts at 0).

    `docs` are token lists; `first_labels[d]` the index of d's first token that must be predicted (the cut keeps
    the token before it, whose hidden state predicts it). Returns (order, shared, anchor): `order` lists the
    documents, each anchor followed by those that share its prefix; `shared[d]` is how many leading tokens d
    takes from `anchor[d]` (0 and itself for anchors). One level: a document that shares is not shared from.
    """
    if min_shared < 2:
        raise ValueError(f"min_shared={min_shared}: must be >= 2")
    anchors: list[int] = []
    followers: dict[int, list[int]] = {}
    shared = [0] * len(docs)
    anchor = list(range(len(docs)))
    for d, tokens in enumerate(docs):
        best, best_anchor = 0, None
        for a in anchors:
            n = _common(docs[a], tokens)
            if n > best:
                best, best_anchor = n, a
        best = min(best, first_labels[d] - 1, len(tokens) - 1)
        if best_anchor is not None and best >= min_shared:
            shared[d], anchor[d] = best, best_anchor
            followers[best_anchor].append(d)
        else:
            anchors.append(d)
            followers[d] = []
    order = [d for a in anchors for d in (a, *followers[a])]
    # A document that starts at position P must not continue the one before it (P = its last position + 1),
    # or the attention could not tell them apart; one token less shared settles it.
    last = None
    for d in order:
        if shared[d] and last is not None and shared[d] == last + 1:
            shared[d] -= 1  # still >= 1: min_shared >= 2
        last = len(docs[d]) - 1  # a document's last position, shared or not
    return order, shared, anchor


def segment_first_positions(position_ids, bounds: list[tuple[int, int]]) -> list[int]:
    """The position id each document of `bounds` starts at: 0, or the length of the prefix it shares with the last
    document before it that starts at 0 (finetune.train.shared_prefix packs such rows)."""
    if position_ids is None:
        return [0] * len(bounds)
    return position_ids[0, [start for start, _ in bounds]].tolist()


def sdpa_packed_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers attention function: (batch, heads, len, dim) in, (batch, len, heads, dim) out, as sdpa."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = document_bounds(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    # A packed row of several documents is training (q and kv the same length, no cache); anything else, and
    # any model that is not causal, is sdpa's business.
    if (bounds is None or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True)
            or is_causal is False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    firsts = segment_first_positions(kwargs.get("position_ids"), bounds)
    dtype = query.dtype
    if (query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and query.requires_grad
            and fp32_backward_faster(dtype, query.shape[1], key.shape[1], query.shape[3], probe_lengths(bounds))):
        query, key, value = query.float(), key.float(), value.float()
    # split, not a slice per document: the backward of each slice writes a zero tensor of the whole row and
    # adds it up (14 documents x 3 tensors x 30 layers: 0.4 s of the demo's 3.3 s step), split's is one cat
    lengths = [end - start for start, end in bounds]
    pieces = []
    # CPU autocast would cast fp32 inputs of sdpa straight back to bf16
    with torch.autocast("cpu", enabled=False) if query.dtype != dtype else contextlib.nullcontext():
        anchor = None  # (k, v) of the last document that starts at position 0
        for q, k, v, first in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), firsts):
            if first == 0:
                anchor = (k, v)
                pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                             is_causal=True, enable_gqa=groups > 1))
                continue
            # A document whose first `first` tokens are the anchor's (finetune.train.shared_prefix): it attends to
            # the anchor's keys and values of those positions, then causally to its own.
            if anchor is None or anchor[0].shape[2] < first:
                raise ValueError(f"sdpa_packed: a document starts at position {first} but no document before it "
                                 f"starting at 0 has {first} tokens to share (shared-prefix packing is malformed)")
            n = q.shape[2]
            mask = torch.ones(n, first + n, dtype=torch.bool, device=q.device).tril(diagonal=first)
            pieces.append(F.scaled_dot_product_attention(
                q, torch.cat([anchor[0][:, :, :first], k], 2), torch.cat([anchor[1][:, :, :first], v], 2),
                attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1))
    out = torch.cat(pieces, dim=2).to(dtype)
    return out.transpose(1, 2).contiguous(), None


def probe_lengths(bounds: list[tuple[int, int]]) -> tuple[int, ...]:
    """The first PROBE_DOCS document lengths of a row, sorted: what its probe measures and caches under."""
    return tuple(sorted(end - start for start, end in bounds[:PROBE_DOCS]))


def probe_ms(dtype, heads: int, kv_heads: int, head_dim: int, lengths: tuple[int, ...]) -> tuple[float, float]:
    """Best-of-PROBE_REPEATS milliseconds of causal sdpa forward + backward over a packed row of documents of
    `lengths`, its inputs in `dtype`: computed so, and cast to fp32 around sdpa (the two interleaved, so a burst
    of load from another process does not decide)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    shapes = ((1, heads, tokens, head_dim), (1, kv_heads, tokens, head_dim))
    q, k, v = (torch.randn(shapes[i > 0], generator=gen).to(dtype).requires_grad_() for i in range(3))
    grad = torch.randn(shapes[0], generator=gen).to(dtype)
    best = [float("inf"), float("inf")]
    with torch.autocast("cpu", enabled=False):  # the probe runs inside a training forward
        for rep in range(PROBE_REPEATS + 1):  # the first round picks and prepares kernels
            for cast in (False, True):
                started = time.perf_counter()
                a, b, c = (x.float() for x in (q, k, v)) if cast else (q, k, v)
                out = torch.cat([F.scaled_dot_product_attention(x, y, z, is_causal=True, enable_gqa=heads != kv_heads)
                                 for x, y, z in zip(a.split(lengths, 2), b.split(lengths, 2), c.split(lengths, 2))], 2)
                out.to(dtype).backward(grad)
                if rep:
                    best[cast] = min(best[cast], (time.perf_counter() - started) * 1e3)
    return best[0], best[1]


def choose_fp32(native_ms: float, fp32_ms: float, margin: float = PROBE_MARGIN) -> bool:
    return fp32_ms * margin <= native_ms


_CHOICES: dict[tuple, bool] = {}


def _choice_file(key: tuple) -> Path:
    """Where this CPU + torch version keeps the choice for `key`: a probe within a few % of the margin would
    otherwise flip between runs and, with it, the run's last digits (same as finetune.models.cpu's timing)."""
    import hashlib
    import json

    import torch

    from finetune.models.cpu import detect_features
    from finetune.paths import cache_root

    f = detect_features()
    ident = json.dumps([f.model, f.capability, torch.__version__, str(key[0]), *key[1:]])
    return cache_root() / "cpu" / f"attention-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def fp32_backward_faster(dtype, heads: int, kv_heads: int, head_dim: int, lengths: tuple[int, ...]) -> bool:
    """Whether this CPU trains the attention of packed documents of about these `lengths` faster with q, k, v
    cast to fp32 than in `dtype`: measured on the first row of each mean length (rounded up to PROBE_STEP) and
    shape (a few ms), logged, and kept for the process and under `<cache>/cpu/` for this CPU."""
    import json

    from finetune.files import write_json_atomic

    mean = sum(lengths) / len(lengths)
    key = (dtype, heads, kv_heads, head_dim, PROBE_STEP * max(1, -(-int(mean) // PROBE_STEP)))
    if key in _CHOICES:
        return _CHOICES[key]
    path = _choice_file(key)
    try:
        _CHOICES[key] = bool(json.loads(path.read_text())["fp32"])
        return _CHOICES[key]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    native, fp32 = probe_ms(dtype, heads, kv_heads, head_dim, lengths)
    _CHOICES[key] = choose_fp32(native, fp32)
    log.info("attention of packed documents on CPU (lengths %s, %d heads of %d): sdpa forward+backward %s "
             "%.2f ms, fp32 %.2f ms -> %s", "/".join(map(str, lengths)), heads, head_dim,
             str(dtype).replace("torch.", ""), native, fp32,
             "fp32 (cast around sdpa)" if _CHOICES[key] else "as computed")
    try:
        write_json_atomic(path, {"lengths": list(lengths), "native_ms": native, "fp32_ms": fp32,
                                 "fp32": _CHOICES[key]})
    except OSError as e:  # a read-only cache costs a probe per process, nothing else
        log.debug("cannot cache the attention choice at %s: %s", path, e)
    return _CHOICES[key]


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (attention and mask builder). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_packed_forward)
    # The mask is sdpa's: rows that are not split (padded batches, generation) need it as sdpa would; a split
    # row ignores it (the documents are taken from the position ids instead).
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def packed_attention(model):
    """Run `model` with sdpa_packed inside the block when it computes with sdpa (restored after); yields whether
    its attention is sdpa_packed in the block. Other implementations (eager asked for on purpose,
    flash_attention_2, flex) are left alone, as is a model class that takes no registered attention function."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        yield False
        return
    register()
    if impl != NAME:
        try:
            model.set_attn_implementation(NAME)
        except (ValueError, AttributeError):
            yield False
            return
    try:
        yield True
    finally:
        if impl != NAME:
            model.set_attn_implementation(impl)
