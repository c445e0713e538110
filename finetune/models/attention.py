"""Per-document attention for packed rows, on top of torch's scaled_dot_product_attention.

trl's padding-free packing puts several documents into one row and marks them by position ids that restart at
0. With `sdpa`, transformers then builds a (row x row) block-diagonal mask and sdpa computes every score of the
row, masked or not: for a 2,048-token row of ten 200-token documents that is about ten times the attention work
that matters, and with an explicit mask torch's CPU kernel also keeps the whole score matrix for backward.

`sdpa_packed` (model.attn_implementation=sdpa_packed, registered with transformers' AttentionInterface) reads the
document boundaries from the position ids and runs sdpa once per document with `is_causal=True` (no mask built
into the kernel, flash-style kernel on CPU). Rows without restarts (generation, evaluation, unpacked batches)
go to transformers' own sdpa unchanged, with the mask they come with. The outputs are those of sdpa with the
block mask (tests/models/test_attention.py compares them and their gradients); the measured speed is in
configs/model/smollm2_135m_instruct.yaml and benchmarks/train_throughput.py.
"""
from __future__ import annotations

import contextlib

NAME = "sdpa_packed"


def document_bounds(position_ids, cu_seq_lens=None) -> list[tuple[int, int]] | None:
    """[(start, end), ...] of the documents in a single packed row: the cumulative lengths trl's padding-free
    collator passes (`cu_seq_lens_q`), else from position ids that restart at 0; None when there is more than
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
    pieces = []
    for start, end in bounds:
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                     enable_gqa=groups > 1))
    out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


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
