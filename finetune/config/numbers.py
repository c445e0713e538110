"""Numbers checked as numbers: no NaN or infinity anywhere in the schema, seeds that numpy accepts.

Every range check in the groups is written `x <= 0` or `not 0 <= x < 1`, and every comparison with NaN is
false, so `train.learning_rate=nan` passed them all and `train.max_grad_norm=nan` silently turned clipping
off. No float of this schema has a meaning at NaN or +-inf (a gate that is off is null, not inf), so one walk
over the whole tree refuses them, whatever group a float is added to later.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

# numpy.random.seed (which transformers.set_seed calls) takes 0 <= seed < 2**32 and raises a ValueError deep
# in the trainer otherwise.
MAX_SEED = 2**32 - 1


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{prefix[:-1]}[{i}].")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], obj


def non_finite_problems(cfg: Any) -> list[str]:
    """Every float of the config tree that is NaN or +-inf, and every seed outside numpy's range, by key."""
    out = []
    for key, value in _leaves(cfg, ""):
        if key.startswith("model.architecture"):
            continue  # free-form numbers of a model's config.json, checked by the memory plan
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{key}={value}: not a finite number; give a real value (or null where the key allows it)")
        elif key.rsplit(".", 1)[-1] == "seed" and isinstance(value, int) and value > MAX_SEED:
            out.append(f"{key}={value}: seeds must be in 0..{MAX_SEED} (numpy's range, 2^32 - 1)")
    return out
