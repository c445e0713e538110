"""Where things live: shipped configs and recipes (checkout or installed wheel), demo data, caches."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    # In a wheel, configs/ and recipes/ are installed inside the package (see pyproject.toml);
    # in a checkout (editable install) they sit beside it at the top level.
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONFIG_DIR = _shipped("configs")
RECIPES_DIR = _shipped("recipes")
DEMO_DATA_DIR = PACKAGE_DIR / "demo_data"


def cache_root() -> Path:
    """Root of everything we cache (embedded model, preprocessed data); FINETUNE_CACHE overrides."""
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "finetune"


@functools.lru_cache(maxsize=None)
def source_hash(*roots: Path) -> str:
    """sha256 of the source under `roots` (every .py file of a folder, or the file itself), by path and bytes.

    Read once per process: cache keys use it so that a change to the code that made an entry never reuses it.
    """
    h = hashlib.sha256()
    for root in roots:
        for f in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(str(f.relative_to(PACKAGE_DIR) if f.is_relative_to(PACKAGE_DIR) else f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
