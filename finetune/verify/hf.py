"""The two transformers engines: the merged folder (the reference) and the adapter on its training base.

Each prompt is generated alone (no padding), greedy, with the raw logits of every step kept, so the numbers are
the unpadded ones that llama.cpp and vLLM compute too. The stop set is the engine's own: the merged folder's
generation_config.json (what a plain `model.generate` of the shipped artifact stops on), and for the adapter the
set `finetune generate` uses.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.verify.report import Completion, EngineResult


def greedy_completions(model, tokenizer, convs: list[list[dict]], stops: list[int], max_new_tokens: int,
                       top_logprobs: int) -> list[Completion]:
    """One greedy reply per conversation, rendered with `tokenizer`'s chat template, cut at the first stop id."""
    import torch

    from finetune.data import render_prompt

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out = []
    model.eval()
    for conv in convs:
        ids = render_prompt(tokenizer, conv)
        with torch.inference_mode():
            res = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long, device=device), max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=stops, pad_token_id=pad,
                output_logits=True, return_dict_in_generate=True)
        new = res.sequences[0, len(ids):].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), None)
        tokens, stop = (new, None) if cut is None else (new[:cut], new[cut])
        lps = None
        if top_logprobs:
            lps = []
            for step in res.logits[:len(tokens) + (stop is not None)]:
                values, idx = torch.log_softmax(step[0].float(), -1).topk(top_logprobs)
                lps.append({int(i): float(v) for i, v in zip(idx, values)})
        out.append(Completion(ids, tokens, stop, lps))
    return out


def merged_engine(merged_dir: Path, convs: list[list[dict]], dtype, device: str, max_new_tokens: int,
                  top_logprobs: int) -> tuple[EngineResult, object]:
    """The reference: the merged folder as plain transformers loads it. Returns the result and its tokenizer."""
    from transformers import GenerationConfig

    from finetune.generate.generation import load_merged, stop_token_ids

    started = time.perf_counter()
    model, tokenizer = load_merged(merged_dir, device, dtype)
    try:
        gen = GenerationConfig.from_pretrained(merged_dir)
    except OSError:
        raise FinetuneError(f"{merged_dir}: generation_config.json is missing, so no engine knows where a reply "
                            "ends; merge again (`finetune merge run=<run> merge.overwrite=true`)") from None
    stops = [i for i in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
             if isinstance(i, int)] or stop_token_ids(tokenizer)
    completions = greedy_completions(model, tokenizer, convs, stops, max_new_tokens, top_logprobs)
    del model
    gc.collect()
    label = f"merged folder in transformers ({str(dtype).removeprefix('torch.')})"
    return EngineResult("merged", label, completions, seconds=time.perf_counter() - started,
                        info={"path": str(merged_dir), "stop_ids": stops}), tokenizer


def adapter_engine(cfg: FinetuneConfig, adapter_dir: Path, convs: list[list[dict]], device: str,
                   max_new_tokens: int, top_logprobs: int) -> EngineResult:
    """The adapter unmerged on its base, quantized as trained (the model the training run evaluated)."""
    from transformers import AutoTokenizer

    from finetune.generate.generation import stop_token_ids
    from finetune.models.adapter import load_adapter_model

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the training tokenizer and chat template
    model = load_adapter_model(cfg, adapter_dir, device, quantize=True)
    completions = greedy_completions(model, tokenizer, convs, stop_token_ids(tokenizer, model), max_new_tokens,
                                     top_logprobs)
    del model
    gc.collect()
    base = "4-bit" if cfg.quant.is_4bit else "8-bit" if cfg.quant.method == "int8" else "unquantized"
    return EngineResult("adapter", f"adapter on the {base} training base, transformers + peft", completions,
                        seconds=time.perf_counter() - started, info={"path": str(adapter_dir)})
