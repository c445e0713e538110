"""Shared-prefix packing: a packed row computes each common prompt prefix once.

The documents of a packed row often begin with the same tokens: the chat template's system prompt, the task's
instruction, a structured row's schema. The demo's 440 training rows were 71,857 tokens (2026-12-04), 54,349
of them prompt; packed by trl into 36 rows of 2,048 tokens, 23,861 of them (33%, 54 a document) repeat an
earlier document's leading tokens in their row. Computing those once is exact: a causal model's keys and
values at positions 0..P-1 depend only on tokens 0..P-1, so a document that repeats them may attend to another
document's keys and values there instead of its own, and the gradient that flowed into both copies flows into
the one.

`SharedPrefixCollator` wraps trl's padding-free collator. After trl has flattened the micro-batch into one row,
each document (after the first of its kind) whose first P prompt tokens equal those of an earlier document
(its anchor) is cut to its last tokens and given position ids P, P+1, ...; it moves right after its anchor, so
the anchor is always the last document before it that starts at position 0. The per-document attention
(finetune.models.attention.sdpa_packed) reads that layout from the position ids. What is cut is prompt only:
P stops one token before the document's first label (that token's hidden state predicts the label, and the
label shift never reaches across a cut), so the labels, the label count the loss is divided by and the optimizer steps are those of the
row unshared; only the arithmetic order differs (tests/test_shared_prefix.py compares losses and gradients, and
5 training steps). LoRA dropout draws its random masks per computed token, so with dropout a run takes another,
equally likely, random path than it would unshared.

Rows and steps are what trl's packing made (max_length counts the tokens before sharing), so a run trains on the
same documents per step as without sharing, in fewer tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from finetune.models.attention import MIN_SHARED, plan_shared_prefixes

log = logging.getLogger("finetune.train.shared_prefix")

# trl's collator keys that describe documents by their starts at position 0 (varlen kernels, linear-attention
# convolutions): wrong once a document starts at P > 0, so they are dropped where a row was shared (sdpa_packed
# reads the documents from the position ids).
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def plan_row(ids: list[int], labels: list[int], positions: list[int], min_shared: int = MIN_SHARED):
    """The shared layout of one flattened padding-free row (documents start where position ids are 0).

    Returns (docs, order, shared), or None when the row does not start a document at 0: `docs` are the
    documents' (start, end); `order` and `shared` as finetune.models.attention.plan_shared_prefixes gives them,
    each document keeping at least the token before its first label (it predicts that label).
    """
    starts = [i for i, p in enumerate(positions) if p == 0]
    if not starts or starts[0] != 0:
        return None
    docs = list(zip(starts, starts[1:] + [len(ids)]))
    first_labels = [next((t for t in range(e - s) if labels[s + t] != -100), e - s) for s, e in docs]
    order, shared, _ = plan_shared_prefixes([ids[s:e] for s, e in docs], first_labels, min_shared)
    return docs, order, shared


def share_row(ids: list[int], labels: list[int], positions: list[int], min_shared: int = MIN_SHARED):
    """(ids, labels, positions) of the row with shared prefixes cut, or None when nothing is shared."""
    planned = plan_row(ids, labels, positions, min_shared)
    if planned is None:
        return None
    docs, order, shared = planned
    if not any(shared):
        return None
    out_ids: list[int] = []
    out_labels: list[int] = []
    out_pos: list[int] = []
    for d in order:
        s, e = docs[d]
        cut = shared[d]
        out_ids += ids[s + cut:e]
        out_labels += labels[s + cut:e]
        out_pos += list(range(cut, e - s))
    return out_ids, out_labels, out_pos


@dataclass
class SharingStats:
    tokens_before: int = 0
    tokens_after: int = 0
    documents: int = 0
    documents_shared: int = 0
    logged: bool = field(default=False, repr=False)


class SharedPrefixCollator:
    """trl's padding-free collator, then each flattened row's shared prefixes cut (module docstring)."""

    def __init__(self, inner, min_shared: int = MIN_SHARED):
        if min_shared < 2:
            raise ValueError(f"min_shared={min_shared}: must be >= 2")
        self.inner = inner
        self.min_shared = min_shared
        self.stats = SharingStats()

    def __getattr__(self, name):  # the Trainer and trl read the wrapped collator's settings
        if name == "inner":  # not set yet (unpickling in a dataloader worker)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, examples):
        import torch

        out = self.inner(examples)
        ids, labels, positions = out["input_ids"], out["labels"], out.get("position_ids")
        if positions is None or ids.shape[0] != 1:
            return out
        before = ids.shape[1]
        row = share_row(ids[0].tolist(), labels[0].tolist(), positions[0].tolist(), self.min_shared)
        st = self.stats
        st.tokens_before += before
        st.documents += int((positions[0] == 0).sum())
        if row is None:
            st.tokens_after += before
            return out
        new_ids, new_labels, new_pos = row
        st.tokens_after += len(new_ids)
        st.documents_shared += sum(1 for i, p in enumerate(new_pos) if p and (i == 0 or new_pos[i - 1] + 1 != p))
        out["input_ids"] = torch.tensor([new_ids], dtype=ids.dtype)
        out["labels"] = torch.tensor([new_labels], dtype=labels.dtype)
        out["position_ids"] = torch.tensor([new_pos], dtype=positions.dtype)
        for key in _VARLEN_KEYS:
            out.pop(key, None)
        if not st.logged:
            st.logged = True
            log.info("shared prefixes: the first row went from %s to %s tokens (%d of its %d documents take "
                     "their leading prompt tokens from an earlier one; train.share_prefixes=false turns it off)",
                     f"{before:,}", f"{len(new_ids):,}", st.documents_shared, st.documents)
        return out
