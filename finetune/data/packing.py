"""Which attention backends keep packed sequences apart.

trl packs with strategy "bfd" into one padding-free row per batch and passes per-sequence
`position_ids` (and `cu_seq_lens_*`) instead of an attention mask. In transformers 5 the mask
builders of eager / sdpa / flex_attention detect the position resets and build a block-diagonal
causal mask, and the flash-attention kernels use cu_seq_lens; any other backend would let tokens
attend across sequence boundaries and silently compute a different loss.
"""
from __future__ import annotations

from finetune.errors import ConfigError


def supported_attn_implementations() -> tuple[str, ...]:
    """Backends whose mask builders transformers registers (these all honour packed position_ids)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return tuple(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


def check_packing_supported(attn_implementation: str | None) -> None:
    """Raise ConfigError if packed (padding-free) training cannot be isolated per sequence with this backend.

    None means the model's default (sdpa in transformers 5), which works.
    """
    if attn_implementation is None:
        return
    ok = supported_attn_implementations()
    if attn_implementation not in ok:
        raise ConfigError([
            f"attn_implementation={attn_implementation!r} cannot keep packed sequences apart (tokens would attend "
            f"across rows); use one of {', '.join(ok)}, or turn packing off (train.packing=false)"])
