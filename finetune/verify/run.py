"""`finetune verify run=<run>`: held-out prompts through every engine, compared with the merged model, one report.

Order of work: resolve the prompts (verify.prompts, else the run's val split), generate with the reference (the
merged folder in transformers), then each engine of verify.engines in turn, one model in memory at a time (the
vLLM ones in their own environment's process); write <run>/verify/report.json and report.md atomically, then
decide. An engine that is not installed is skipped and logged with its install command; a pair below its
threshold, a different rendered prompt or stop, or an engine that could not load the artifact fails the
command (exit 2) after the report is written.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError

log = logging.getLogger("finetune.verify")


class ParityFailure(FinetuneError):
    """An engine disagrees with the merged model beyond its threshold; the CLI exits non-zero (2)."""


def verification_conversations(cfg: FinetuneConfig, tokenizer) -> tuple[list[list[dict]], str]:
    """Up to verify.num_prompts conversations, last reply removed: verify.prompts, else the run's val split."""
    from finetune.generate.prompts import check_conversations

    return check_conversations(cfg.verify.prompts, "verify.prompts", cfg.data, tokenizer, cfg.verify.num_prompts)


def _paths(run_dir: Path) -> tuple[Path, Path]:
    merged, adapter = run_dir / "merged", run_dir / "adapter"
    if not (merged / "config.json").is_file():
        raise FinetuneError(f"run={run_dir} has no merged model ({merged}); run `finetune merge run={run_dir}` first")
    return merged, adapter


def _end_of_turn_problems(tokenizer, stop_ids: list[int], merged: Path) -> list[str]:
    """The artifact itself must stop at the template's end-of-turn token: every engine reads its eos set."""
    from finetune.generate.generation import end_of_turn_id

    eot = end_of_turn_id(tokenizer)
    if eot is None or eot in stop_ids:
        return []
    return [f"{merged}/generation_config.json: eos_token_id {stop_ids} lacks the chat template's end-of-turn token "
            f"{eot} ({tokenizer.convert_ids_to_tokens(eot)!r}), so engines that read it (transformers, vLLM) write past "
            "the end of a reply; merge again with this version (`finetune merge run=<run> merge.overwrite=true`)"]


def verify_run(cfg: FinetuneConfig, run_dir: Path, *, engines: Optional[dict] = None) -> dict:
    """Write <run>/verify/report.{json,md} and return the report.

    Args:
        cfg: typed config (cfg.verify: engines, prompts, thresholds; model/quant/data as the run was trained).
        run_dir: the training run (merged/ and adapter/ inside; export/ for the GGUF file).
        engines: name -> callable(context) -> EngineResult, replacing the built-in engine of that name (tests).
    Raises:
        FinetuneError before anything runs (no merged model, bad prompts file); ParityFailure after the report is
        written when a pair fails (see finetune/verify/report.py).
    """
    import torch
    from transformers import AutoTokenizer

    from finetune.data.render import render_text
    from finetune.files import write_json_atomic, write_text_atomic
    from finetune.models.load import resolve_device
    from finetune.verify.hf import merged_engine
    from finetune.verify.report import build_report, markdown

    v = cfg.verify
    run_dir = Path(run_dir)
    merged, adapter = _paths(run_dir)
    out_dir = Path(v.output) if v.output else run_dir / "verify"
    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    convs, source = verification_conversations(cfg, tokenizer)
    if not convs:
        raise FinetuneError(f"no prompts to verify with ({source} is empty); pass verify.prompts=<jsonl>")
    dtype = getattr(torch, v.dtype)
    ref, tokenizer = merged_engine(merged, convs, dtype, device, v.max_new_tokens, v.top_logprobs)
    context = {"cfg": cfg, "run_dir": run_dir, "merged": merged, "adapter": adapter, "convs": convs,
               "texts": [render_text(tokenizer, c, add_generation_prompt=True) for c in convs], "device": device,
               "reference": ref, "tokenizer": tokenizer}
    builtin = _builtin_engines()
    results = []
    for name in v.engines:
        log.info("verify: running %s", name)
        result = (engines or {}).get(name, builtin[name])(context)
        if result.skipped:
            log.warning("verify: %s skipped: %s%s", name, result.skipped,
                        f"; install: {result.install}" if result.install else "")
        elif result.error:
            log.error("verify: %s failed: %s", name, result.error)
        results.append(result)
    report = build_report(ref, results, v.thresholds.as_dict(), lambda ids: tokenizer.decode(ids),
                          fail_on_skipped=v.fail_on_skipped, run=str(run_dir), prompt_source=source,
                          max_new_tokens=v.max_new_tokens, dtype=v.dtype,
                          reference_problems=_end_of_turn_problems(tokenizer, ref.info["stop_ids"], merged))
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", markdown(report))
    if not report["ok"]:
        raise ParityFailure(f"engines disagree with the merged model (report: {out_dir / 'report.md'}):\n  "
                            + "\n  ".join(report["failures"]))
    return report


def _builtin_engines() -> dict:
    from finetune.verify.hf import adapter_engine
    from finetune.verify.llamacpp import find_gguf, gguf_engine
    from finetune.verify.report import skipped
    from finetune.verify.vllm_engine import vllm_engine, vllm_python

    def adapter(c):
        if not (c["adapter"] / "adapter_config.json").is_file():
            return skipped("adapter", "adapter on the training base", f"no adapter in the run ({c['adapter']})")
        v = c["cfg"].verify
        return adapter_engine(c["cfg"], c["adapter"], c["convs"], c["device"], v.max_new_tokens, v.top_logprobs)

    def gguf(c):
        v = c["cfg"].verify
        path = Path(v.gguf) if v.gguf else find_gguf(c["run_dir"])
        if v.gguf and not path.is_file():
            raise FinetuneError(f"verify.gguf={v.gguf!r}: file not found")
        return gguf_engine(path, c["texts"], v.max_new_tokens, v.top_logprobs)

    def vllm(name, lora):
        def run(c):
            from finetune.merge.stream import base_checkpoint_dir

            v, ref = c["cfg"].verify, c["reference"]
            if lora and not (c["adapter"] / "adapter_config.json").is_file():
                return skipped(name, "vLLM serving the base + LoRA adapter", f"no adapter in the run ({c['adapter']})")
            longest = max(len(x.prompt_ids) for x in ref.completions)
            return vllm_engine(name, vllm_python(v.vllm_python),
                               base_checkpoint_dir(c["cfg"].model) if lora else c["merged"], c["convs"],
                               eos_ids=ref.info["stop_ids"], adapter_dir=c["adapter"] if lora else None,
                               dtype=v.dtype, max_model_len=longest + v.max_new_tokens + 16,
                               max_new_tokens=v.max_new_tokens, top_logprobs=v.top_logprobs,
                               timeout_s=v.vllm_timeout_s)
        return run

    return {"adapter": adapter, "gguf": gguf, "vllm_merged": vllm("vllm_merged", False),
            "vllm_lora": vllm("vllm_lora", True)}
