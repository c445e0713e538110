"""The GGUF export in llama.cpp (llama-cpp-python): its tokenizer, its end-of-generation set, its greedy decoding.

The prompt is the merged model's rendered text tokenized by llama.cpp (special tokens parsed, no BOS added: the
template writes any BOS it wants), so a tokenizer difference shows as different prompt ids. The chat template in
the file is checked separately by `finetune export` (llama.cpp's own template engine against transformers');
here the reply ends where llama.cpp itself ends it: at a token its vocabulary marks end-of-generation, which is
what llama-server and Ollama stop on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from finetune.verify.report import Completion, EngineResult, skipped

LABEL = "GGUF export in llama.cpp"
INSTALL = "make test-llamacpp (or pip install 'finetune[llamacpp]'; compiles llama.cpp, about 10 min on 2 cores)"
# Finest first: the file closest to the merged weights is the one a parity check can hold to a tight threshold.
QUANT_ORDER = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
               "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def find_gguf(run_dir: Optional[Path]) -> Optional[Path]:
    """The finest-quantized GGUF file under <run>/export/gguf-<quant>/, or None."""
    if run_dir is None or not (Path(run_dir) / "export").is_dir():
        return None
    files = sorted(Path(run_dir, "export").glob("gguf-*/*.gguf"))
    rank = {q: i for i, q in enumerate(QUANT_ORDER)}
    files.sort(key=lambda p: rank.get(p.parent.name.removeprefix("gguf-"), len(rank)))
    return files[0] if files else None


def _is_end_of_generation(llm, token: int) -> bool:
    # llama-cpp-python 0.3 has no public call for llama.cpp's end-of-generation set (eos, eot, <|im_end|>, ...);
    # its model wrapper does. Fall back to the single eos token on a version without it.
    model = getattr(llm, "_model", None)
    if model is not None and hasattr(model, "token_is_eog"):
        return bool(model.token_is_eog(token))
    return token == llm.token_eos()


def gguf_engine(path: Optional[Path], texts: list[str], max_new_tokens: int, top_logprobs: int) -> EngineResult:
    """Greedy replies of the GGUF file at `path` to the rendered prompt texts; skipped when llama.cpp is absent."""
    from finetune.export.verify import LlamaCppReader, llama_cpp_available

    if not llama_cpp_available():
        return skipped("gguf", LABEL, "llama-cpp-python is not installed", INSTALL)
    if path is None:
        return skipped("gguf", LABEL, "no GGUF export in the run", "finetune export run=<run> export.quant=f16")
    import numpy as np

    started = time.perf_counter()
    prompts = []
    reader = None
    try:
        probe = LlamaCppReader(Path(path), n_ctx=64)
        prompts = [probe.tokenize(t) for t in texts]
        probe.close()
        reader = LlamaCppReader(Path(path), n_ctx=max(len(p) for p in prompts) + max_new_tokens + 8)
        llm, out = reader.llm, []
        for ids in prompts:
            tokens, stop = [], None
            for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if _is_end_of_generation(llm, tok):
                    stop = tok
                    break
                tokens.append(tok)
                if len(tokens) >= max_new_tokens:
                    break
            lps = None
            if top_logprobs:
                seq = ids + tokens + ([stop] if stop is not None else [])
                logits = reader.logits(seq)[len(ids) - 1:len(seq) - 1].astype(np.float64)
                logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                    - logits.max(-1, keepdims=True)
                lps = [{int(i): float(row[i]) for i in np.argsort(-row)[:top_logprobs]} for row in logp]
            out.append(Completion(ids, tokens, stop, lps))
    except Exception as e:  # a file llama.cpp refuses is a finding of the report, not a crash of the command
        return EngineResult("gguf", LABEL, error=f"llama.cpp could not run {path}: {type(e).__name__}: {e}",
                            seconds=time.perf_counter() - started, info={"path": str(path)})
    finally:
        if reader is not None:
            reader.close()
    import llama_cpp

    return EngineResult("gguf", f"{LABEL} ({Path(path).parent.name.removeprefix('gguf-')})", out,
                        seconds=time.perf_counter() - started,
                        info={"path": str(path), "llama_cpp_python": llama_cpp.__version__})
