"""Read an exported GGUF file back with a real client and compare it with the merged model in transformers.

Readers: `llama_cpp` (llama-cpp-python, i.e. llama.cpp itself, what Ollama and LM Studio run) and
`transformers` (its own GGUF loader, which dequantizes into a transformers model: a cheaper second reader
that needs no compiler). Both are checked the same way, on held-out prompts:

- tokenizer: the reader's tokenizer turns each rendered prompt into the same ids as transformers';
- chat template: the file's template is the merged model's (llama.cpp: its own template engine renders
  a conversation to the same text);
- greedy output: generated token by token until a stop token, compared with the merged model's;
- logits: on the merged model's greedy sequences, the largest |difference| (what quantization costs).

A tokenizer or template difference means the file is wrong: `verify_gguf` raises. A greedy difference is
reported (`ok: false` + warning), because coarse quantizations (q4_0) may legitimately change a token.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.export.run")

PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (it is compiled on install; see README)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def reference(model_dir: Path, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[list, list]:
    """The merged model's greedy continuations in transformers (fp32, stop token excluded), and its logits
    on each prompt + continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.generate.generation import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gens = [g.token_ids for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          desc="verify: merged model")]
    return gens, [_logits(model, p + g) for p, g in zip(prompts, gens)]


def _logits(model, seq: list[int]):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq])).logits[0].float().numpy()


class LlamaCppReader:
    """llama.cpp through llama-cpp-python: tokenizer, template engine and greedy decoding of the file."""

    name = "llama_cpp"

    def __init__(self, path: Path, n_ctx: int):
        from finetune.export.llamacpp import open_gguf

        threads = min(4, os.cpu_count() or 1)
        self.llm = open_gguf(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                             logits_all=True, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_template(self) -> Optional[str]:
        return self.llm.metadata.get("tokenizer.chat_template")

    def render(self, messages: list[dict]) -> str:
        """The conversation as llama.cpp's own (C++) chat-template code renders it, generation prompt added."""
        import ctypes

        import llama_cpp

        tmpl = self.chat_template().encode("utf-8")
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(keep), True, buf, len(buf))
        if n < 0:
            return "<llama.cpp does not recognise this chat template>"
        return buf.raw[:n].decode("utf-8")

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        out: list[int] = []
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in stops or len(out) >= max_new_tokens:
                break
            out.append(tok)
        return out[:max_new_tokens]

    def logits(self, seq: list[int]):
        self.llm.reset()
        self.llm.eval(seq)
        return self.llm.scores[: len(seq)].copy()

    def close(self) -> None:
        self.llm.close()  # now, not at interpreter exit (where llama-cpp-python's __del__ can fail)


class TransformersReader:
    """transformers' GGUF loader: the file dequantized into a transformers model, tokenizer rebuilt from it."""

    name = "transformers"

    def __init__(self, path: Path, n_ctx: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = dict(gguf_file=path.name)
        self.tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_template(self) -> Optional[str]:
        return self.tok.chat_template

    def render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def greedy(self, prompt: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
        from finetune.generate.generation import generate

        out = generate(self.model, self.tok, [prompt], max_new_tokens=max_new_tokens)[0].token_ids
        return next((out[:k] for k, t in enumerate(out) if t in stops), out)

    def logits(self, seq: list[int]):
        return _logits(self.model, seq)

    def close(self) -> None:
        del self.model


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _compare(r, path, tokenizer, texts, prompts, ref, ref_logits, max_new_tokens, stops) -> list[dict]:
    """Per-prompt comparison rows; raises on a tokenizer or chat-template difference."""
    import numpy as np

    from finetune.distributed import progress

    bad = [k for k, (t, p) in enumerate(zip(texts, prompts)) if r.tokenize(t) != p]
    if bad:
        raise FinetuneError(f"{path}: {r.name} tokenizes prompt {bad[0]} differently from transformers "
                            f"({r.tokenize(texts[bad[0]])[:12]}... vs {prompts[bad[0]][:12]}...): the tokenizer in the "
                            "file is wrong; the export was not published")
    want = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    if r.chat_template() != tokenizer.chat_template or r.render(PROBE) != want:
        raise FinetuneError(f"{path}: {r.name} renders the chat template differently from transformers "
                            f"({r.render(PROBE)[:80]!r}... vs {want[:80]!r}...); the export was not published")
    rows = []
    pairs = progress(zip(prompts, ref, ref_logits), desc=f"verify: {r.name} reads the GGUF", total=len(prompts),
                     unit="prompt")
    for p, want_ids, ref_l in pairs:
        got = r.greedy(p, max_new_tokens, stops)
        diff = float(np.abs(r.logits(p + want_ids)[len(p) - 1:] - ref_l[len(p) - 1:]).max())
        rows.append({"prompt_tokens": len(p), "reference_tokens": len(want_ids), "gguf_tokens": len(got),
                     "identical": got == want_ids, "matching_prefix": _common_prefix(got, want_ids),
                     "max_abs_logit_diff": diff})
    return rows


def verify_gguf(path: Path, model_dir: Path, tokenizer, convs: list[list[dict]], *, reader: str,
                max_new_tokens: int) -> dict:
    """Compare the GGUF file at `path` with the merged model in `model_dir` (see the module docstring).

    Raises:
        FinetuneError when the reader tokenizes a prompt differently or carries another chat template.
    """
    import numpy as np

    from finetune.generate.generation import stop_token_ids

    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    prompts = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    ref, ref_logits = reference(model_dir, tokenizer, prompts, max_new_tokens)
    n_ctx = max([len(p) + len(g) for p, g in zip(prompts, ref)] + [64]) + max_new_tokens + 8
    r = (LlamaCppReader if reader == "llama_cpp" else TransformersReader)(Path(path), n_ctx)
    try:
        rows = _compare(r, path, tokenizer, texts, prompts, ref, ref_logits, max_new_tokens,
                        stop_token_ids(tokenizer, generation_config=_generation_config(model_dir)))
    finally:
        r.close()
    same = sum(x["identical"] for x in rows)
    total = sum(x["reference_tokens"] for x in rows)
    report = {"reader": r.name, "prompts": len(rows), "tokenizer_identical": True, "chat_template_identical": True,
              "identical_greedy_outputs": same,
              "matching_prefix_share": (sum(x["matching_prefix"] for x in rows) / total) if total else 1.0,
              "max_abs_logit_diff": max((x["max_abs_logit_diff"] for x in rows), default=0.0),
              "max_abs_logit": float(max((np.abs(x).max() for x in ref_logits), default=0.0)),
              "ok": same == len(rows), "rows": rows}
    if not report["ok"]:
        report["warning"] = (f"{r.name}'s greedy output differs from the merged model's on {len(rows) - same} of "
                             f"{len(rows)} prompts (quantization changed a token); a finer export.quant keeps it")
        log.warning(report["warning"])
    return report


def _generation_config(model_dir: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


def verification_conversations(export_cfg, data_cfg, tokenizer, run_dir: Optional[Path]) -> tuple[list, str]:
    """Up to export.verify_prompts conversations (last reply removed): export.prompts, else the run's val split."""
    from finetune.generate.prompts import check_conversations

    return check_conversations(export_cfg.prompts, "export.prompts", data_cfg, tokenizer, export_cfg.verify_prompts,
                               have_data=run_dir is not None)
