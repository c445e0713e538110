"""The loss head on devices without Triton (CPU): label positions only, the projection in the compute dtype.

trl's SFTTrainer computes the loss with a fused LM head (trl.trainer.utils.add_fused_lm_head) that never
builds the full logits. On CUDA its Triton kernels score only the positions that have a label. Elsewhere trl
falls back to torch ops that score every position of the row, and its backward accumulates each vocabulary
tile's products in fp32 (`addmm_` on fp32 copies of the bf16 tiles). On a CPU where bf16 matmuls are fast that
is the slowest part of a step: profiled on SmolLM2-135M (vocabulary 49,152), one 2,048-token packed row of the
demo data (about 600 label tokens), nf4 QLoRA, bf16, 2 cores: the head took 5.7 of the step's 11.7 s.

`compact_lm_head` replaces that path when the device has no Triton: only positions whose next token is a label
are projected (the same `hidden[mask]` trl's CUDA path uses), through the output head in the autocast dtype,
widened to fp32 for the log-softmax, in token chunks that are recomputed in backward (torch.utils.checkpoint)
so at most one chunk's fp32 logits (CHUNK_BYTES) exist at once. The gradient with respect to the hidden states
is one matmul over the whole vocabulary per chunk, so it is rounded once, as an ordinary Linear's is (trl's
warning about summing per-tile bf16 products does not apply). The loss and the metrics trl logs (entropy,
mean token accuracy) match trl's path: tests/train/test_loss_head.py compares them and the gradients.
"""
from __future__ import annotations

import functools
import logging
import types

log = logging.getLogger("finetune.train.loss_head")

# fp32 logits per chunk: 64 MB, so that a chunk's logits, log-softmax and their gradient stay near 200 MB
# whatever the vocabulary: 341 tokens for SmolLM2's 49,152, 110 for Qwen2.5's 151,936. Chunks of 1,024 tokens
# (622 MB of logits per tensor for Qwen2.5) made the project's QLoRA peak 1.3x stock trl's in benchmarks/memory.py
# (9,066 vs 6,978 MB, 2026-12-02). Every chunk is recomputed in backward, so only one chunk's tensors live.
CHUNK_BYTES = 64 * 2 ** 20
CHUNK_TOKENS = None  # tests set a fixed chunk


def chunk_tokens(vocab: int) -> int:
    return CHUNK_TOKENS or max(32, CHUNK_BYTES // (4 * vocab))


def _chunk_terms(weight, bias, h, y):
    """Sum of the label log-probabilities of rows `h` (tokens x hidden) with labels `y`; and, without gradient,
    each row's entropy and whether its label is the arg-max."""
    import torch
    import torch.nn.functional as F

    z = F.linear(h, weight.to(h.dtype) if not torch.is_autocast_enabled(h.device.type) else weight, bias).float()
    logp = z.log_softmax(-1)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        top1 = z.argmax(-1) == y
    return picked, entropy, top1


def _label_terms(weight, bias, hidden, labels):
    """(log_probs, entropy, is_top1) of the label positions, chunked over tokens."""
    import torch
    from torch.utils.checkpoint import checkpoint

    parts = []
    step = chunk_tokens(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        h, y = hidden[start:start + step], labels[start:start + step]
        if hidden.requires_grad:
            parts.append(checkpoint(_chunk_terms, weight, bias, h, y, use_reentrant=False))
        else:
            parts.append(_chunk_terms(weight, bias, h, y))
    if not parts:  # no label at all in this micro-batch
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty + hidden.sum() * 0, empty, empty.bool()
    return tuple(torch.cat(p) for p in zip(*parts))


def supported(model) -> str | None:
    """Why the compact head cannot stand in for trl's (None when it can): logit scaling, soft-capping or an
    MoE auxiliary loss are trl's to handle."""
    from finetune.models.load import logits_not_plain

    return logits_not_plain(model)


def compact_lm_head(model, original_forward) -> None:
    """Patch `model` (the base model under peft, after trl's add_fused_lm_head) so that
    `model(..., labels=..., fused_lm_head=True)` runs the compact head. `original_forward`: trl's patched
    forward, which still serves every call without `fused_lm_head` (generation, logits)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    @functools.wraps(type(model).forward)
    def _forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                 **kwargs):
        if not fused_lm_head:
            return original_forward(*args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        mask = labels != -100
        picked, entropy, top1 = _label_terms(head.weight, head.bias, hidden[mask], labels[mask])
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        log_probs = zeros.masked_scatter(mask, picked)  # keeps the graph even with no label (a zero loss)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=zeros.masked_scatter(mask, entropy),
            is_top1=torch.zeros_like(mask).masked_scatter(mask, top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(_forward, model)


def use_compact_head(trainer) -> bool:
    """Swap trl's torch fallback for the compact head when the training device has no Triton kernels for it."""
    from peft import PeftModel
    from trl.kernels.chunked_logprob import _use_triton

    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    if _use_triton(trainer.args.device):
        return False
    why = supported(model)
    if why:
        log.info("loss head: trl's fused head (%s)", why)
        return False
    compact_lm_head(model, model.forward)
    log.info("loss head: label positions only, %s projection (finetune.train.loss_head)",
             "autocast-dtype" if trainer.args.bf16 or trainer.args.fp16 else "fp32")
    return True
