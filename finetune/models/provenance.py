"""Where an artifact comes from, and whether two artifacts belong together.

Every artifact a run publishes (adapter/, merged/, export/gguf-*/, eval/report.json) carries a `provenance`
record: the base model's identity (name, revision, SHA-256 of its config.json, a fingerprint of its weight
files) and the SHA-256 of the adapter weights it was made from. Commands that combine artifacts (merge, eval,
export, generate from a run) call `check_belongs` and refuse, naming both sides, when they do not match: an
eval of a merged/ made from another base used to score it and rewrite its model card with the wrong base.

Also here: `check_finite_weights`, the last gate before an adapter or merged folder is published.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.files import sha256_file

log = logging.getLogger("finetune.models.provenance")

PROVENANCE = "provenance.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Fingerprint reads, per weight file, its size, its safetensors header (names, dtypes, shapes, offsets) and 64 KiB
# at the start, middle and end of the data: milliseconds, where a full SHA-256 of Qwen2.5-3B's 6 GB of shards
# takes ~15 s at 400 MB/s. A retrained or re-quantized base changes the header or those bytes.
_SAMPLE = 64 << 10


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return [f for f in files if not f.name.startswith(("adapter_model", "training_args"))]


def weights_fingerprint(folder: Path) -> Optional[str]:
    """A fast fingerprint of the weight files in `folder` (see _SAMPLE), or None when it has none."""
    files = _weight_files(folder)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            h.update(head)
            if f.suffix == ".safetensors" and len(head) == 8:
                h.update(fh.read(min(int.from_bytes(head, "little"), 100 << 20)))  # the JSON header
            for offset in (0, size // 2, max(size - _SAMPLE, 0)):
                fh.seek(offset)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def local_model_dir(model_cfg: ModelConfig) -> Optional[Path]:
    """The folder the base model loads from: a local path, an embedded model, or a Hub id already in the HF
    cache; None for a Hub model not downloaded yet (its identity is then name + revision only)."""
    from finetune.models.load import model_path

    path = Path(model_path(model_cfg))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), revision=model_cfg.revision, local_files_only=True,
                                      allow_patterns=["config.json"]))
    except Exception:  # not cached, offline, not a repo id: identity falls back on the name
        return None


def base_identity(model_cfg: ModelConfig, folder: Optional[Path] = None) -> dict[str, Any]:
    """{name, revision, config_sha256, weights_fingerprint} of the base model (folder: where it was loaded)."""
    folder = folder if folder is not None else local_model_dir(model_cfg)
    ident: dict[str, Any] = {"name": model_cfg.name_or_path, "revision": model_cfg.revision,
                             "config_sha256": None, "weights_fingerprint": None}
    if folder is not None and (folder / "config.json").is_file():
        ident["config_sha256"] = sha256_file(folder / "config.json")
        ident["weights_fingerprint"] = weights_fingerprint(folder)
    return ident


def adapter_sha256(adapter_dir: Path) -> Optional[str]:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    return sha256_file(path) if path.is_file() else None


def read_provenance(folder: Path) -> Optional[dict]:
    """The provenance record of an artifact folder, or None when it has none (made before provenance existed).

    Raises:
        FinetuneError: the file exists but is not JSON (a damaged artifact).
    """
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path}: not valid JSON ({e}); the artifact is damaged, make it again") from None
    return data if isinstance(data, dict) else None


def artifact_provenance(model_cfg: ModelConfig, adapter_dir: Optional[Path], **extra: Any) -> dict[str, Any]:
    """The record written into a merged/, export or eval artifact made from `adapter_dir` on this base."""
    adapter = read_provenance(adapter_dir) if adapter_dir else None
    base = (adapter or {}).get("base") or base_identity(model_cfg)
    return {"base": base, "adapter_sha256": adapter_sha256(adapter_dir) if adapter_dir else None,
            "adapter": str(adapter_dir) if adapter_dir else None, **extra}


def _differences(a: dict, b: dict) -> list[str]:
    keys = ["config_sha256", "weights_fingerprint"]
    both = [k for k in keys if a.get(k) and b.get(k)]
    if not both:  # nothing measured on one side: the names are all we can compare
        both = ["name", "revision"]
    return [k for k in both if a.get(k) != b.get(k)]


def _describe(ident: dict) -> str:
    rev = f"@{ident['revision']}" if ident.get("revision") else ""
    cfg = (ident.get("config_sha256") or "?")[:12]
    return f"{ident.get('name')}{rev} (config {cfg})"


def check_same_base(a: Optional[dict], a_label: str, b: Optional[dict], b_label: str) -> None:
    """Refuse when two base identities differ; unknown on either side (older artifacts) passes with a warning.

    Raises:
        FinetuneError: naming both artifacts, both bases and the fields that differ.
    """
    if not a or not b:
        log.warning("cannot check that %s and %s share a base model: %s has no provenance", a_label, b_label,
                    a_label if not a else b_label)
        return
    diffs = _differences(a, b)
    if diffs:
        raise FinetuneError(
            f"{a_label} and {b_label} do not belong together: {a_label} was made from base {_describe(a)}, "
            f"{b_label} from {_describe(b)} ({', '.join(diffs)} differ). Use the base the adapter was trained on "
            "(model=... as in the run's config.yaml), or make the artifact again from this run")


def check_belongs(artifact: Path, adapter_dir: Path, model_cfg: Optional[ModelConfig] = None) -> None:
    """`artifact` (merged/ or an export) was made from `adapter_dir` and, where given, from this base model.

    Raises:
        FinetuneError: the adapter hashes or the bases differ; the message names both folders.
    """
    made = read_provenance(artifact)
    adapter = read_provenance(adapter_dir)
    if made is not None and made.get("adapter_sha256"):
        now = adapter_sha256(adapter_dir)
        if now is not None and now != made["adapter_sha256"]:
            raise FinetuneError(
                f"{artifact} and {adapter_dir} do not belong together: {artifact} was made from an adapter with "
                f"SHA-256 {made['adapter_sha256'][:12]}, {adapter_dir} holds {now[:12]} (trained again since?). "
                f"Make it again: finetune merge run=<run dir> merge.overwrite=true")
    check_same_base((made or {}).get("base"), str(artifact), (adapter or {}).get("base"), str(adapter_dir))
    if model_cfg is not None and adapter is not None and adapter.get("base"):
        check_same_base(adapter["base"], str(adapter_dir), base_identity(model_cfg),
                        f"model.name_or_path={model_cfg.name_or_path}")


def check_finite_weights(folder: Path, what: str) -> None:
    """Refuse to publish weights with NaN or infinity: read every safetensors tensor of `folder` once.

    Raises:
        FinetuneError: naming the first bad tensor, how many of its values are bad, and what to try.
    """
    import torch
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise FinetuneError(
                        f"{what}: {path.name} tensor {key} has {bad} of {t.numel()} values NaN or infinite; "
                        "nothing was published. Training diverged: lower train.learning_rate, keep "
                        "train.max_grad_norm > 0, and check the last good checkpoint under checkpoints/")


def check_adapter_base(adapter_dir: Path, model_cfg: ModelConfig) -> None:
    """The adapter in `adapter_dir` was trained on this base model (by its provenance), else FinetuneError."""
    adapter = read_provenance(adapter_dir)
    if adapter is not None and adapter.get("base"):
        check_same_base(adapter["base"], str(adapter_dir), base_identity(model_cfg),
                        f"model.name_or_path={model_cfg.name_or_path}")


def checked_artifact(artifact: Path, run_dir: Optional[Path]) -> Optional[dict]:
    """check_belongs against <run>/adapter when there is one; returns the artifact's provenance (for reports)."""
    if run_dir is not None and (Path(run_dir) / "adapter").is_dir():
        check_belongs(artifact, Path(run_dir) / "adapter")
    return read_provenance(artifact)
