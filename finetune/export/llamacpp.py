"""Opening a GGUF file with llama-cpp-python: the one place the project (verify, benchmarks, tests) does it.

On a CPU with AMX, llama.cpp (llama-cpp-python 0.3.36, built with -march=native) repacks quantized weights
into its AMX buffer type, and decoding a q8_0 or k-quant file then crashes the process (SIGSEGV, measured
2026-12-03 on an Intel Xeon with amx_int8/amx_tile: f16 decoded, q8_0 and q4_k_m crashed in `decode`; with
`use_extra_bufts` off all of them decoded). Llama() has no argument for that field, so it is set on the model
parameters llama.cpp starts from, for this load only.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

log = logging.getLogger("finetune.export.llamacpp")

AMX_FLAGS = ("amx_int8", "amx_tile")
_LOCK = threading.Lock()  # the patched default belongs to one load at a time


def extra_buffers_crash(flags: set[str] | None = None) -> bool:
    """True on a CPU whose AMX makes llama.cpp's repacked weight buffers crash (see the module docstring)."""
    from finetune.models.cpu import cpu_flags

    return bool(set(AMX_FLAGS) & (cpu_flags() if flags is None else flags))


@contextlib.contextmanager
def _without_extra_buffers():
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with _LOCK:
        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = default


def open_gguf(path: Path | str, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with llama.cpp's repacked weight buffers off where they crash."""
    from llama_cpp import Llama

    if not extra_buffers_crash():
        return Llama(model_path=str(path), **kwargs)
    log.info("llama.cpp: repacked (AMX) weight buffers off on this CPU: they crash decoding of quantized files")
    with _without_extra_buffers():
        return Llama(model_path=str(path), **kwargs)
