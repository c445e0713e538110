"""Parity of a merged model with the adapter model as trained: logit differences and greedy agreement."""
from __future__ import annotations

import gc
import logging
from pathlib import Path

from finetune.models.load import resolve_dtype
from finetune.config import FinetuneConfig

log = logging.getLogger("finetune.merge.stream")


def _parity_prompts(cfg: FinetuneConfig, tokenizer) -> tuple[list[list[int]], str]:
    """Prompt ids of up to merge.parity_prompts conversations (merge.prompts, else held-out rows)."""
    from finetune.data import render_prompt
    from finetune.generate.prompts import check_conversations

    convs, source = check_conversations(cfg.merge.prompts, "merge.prompts", cfg.data, tokenizer,
                                        cfg.merge.parity_prompts)
    return [render_prompt(tokenizer, c) for c in convs], source


def _continuation_logits(model, prompt: list[int], seq: list[int]):
    """fp32 logits at the positions that predict each token after the prompt (and the one after the last)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq], device=device)).logits
    return logits[0, len(prompt) - 1:].float().cpu()


def parity_report(cfg: FinetuneConfig, adapter_dir: Path, merged_dir: Path, tokenizer, device: str) -> dict:
    """Compare the adapter model as trained (its quantized base + adapter) with the merged folder.

    Both score the same sequences: each prompt plus the adapter model's greedy continuation. Reported:
    the largest absolute logit difference, the share of positions where both pick the same greedy token,
    and how many greedy generations are identical. One model is in memory at a time.
    """
    from finetune.generate.generation import generate, load_merged
    from finetune.models.adapter import load_adapter_model

    m = cfg.merge
    if m.parity_prompts == 0:
        return {"parity": "skipped (merge.parity_prompts=0)"}
    prompts, source = _parity_prompts(cfg, tokenizer)
    ref = load_adapter_model(cfg, adapter_dir, device, quantize=True)  # quantize=True: as the run's quant group says
    ref_gens = generate(ref, tokenizer, prompts, max_new_tokens=m.parity_max_new_tokens,
                        desc="parity: adapter model")
    seqs = [p + g.token_ids for p, g in zip(prompts, ref_gens)]
    ref_logits = [_continuation_logits(ref, p, s) for p, s in zip(prompts, seqs)]
    del ref
    gc.collect()
    # the files that ship, computing in the dtype the adapter reference computes in
    merged, _ = load_merged(merged_dir, device, resolve_dtype(cfg.quant.compute_dtype, device))
    new_gens = generate(merged, tokenizer, prompts, max_new_tokens=m.parity_max_new_tokens,
                        desc="parity: merged model")
    rows, same, total, worst, scale = [], 0, 0, 0.0, 0.0
    for p, s, ref_l, a, b in zip(prompts, seqs, ref_logits, ref_gens, new_gens):
        new_l = _continuation_logits(merged, p, s)
        agree = int((new_l.argmax(-1) == ref_l.argmax(-1)).sum())
        diff = float((new_l - ref_l).abs().max())
        rows.append({"prompt_tokens": len(p), "positions": len(new_l), "agreeing": agree,
                     "max_abs_logit_diff": diff, "identical_greedy_output": a.token_ids == b.token_ids})
        same, total, worst = same + agree, total + len(new_l), max(worst, diff)
        scale = max(scale, float(ref_l.abs().max()))
    del merged
    agreement = same / max(total, 1)
    out = {"reference": f"adapter on the {cfg.quant.method} base as trained", "prompts": len(prompts),
           "prompt_source": source, "positions": total, "max_abs_logit_diff": worst, "max_abs_logit": scale,
           "greedy_token_agreement": agreement,
           "identical_greedy_outputs": sum(r["identical_greedy_output"] for r in rows),
           "threshold": m.parity_threshold, "ok": agreement >= m.parity_threshold, "warning": None, "rows": rows}
    if not out["ok"]:
        hint = (" Try merge.base=nf4_roundtrip: the weights the adapter was trained against."
                if m.base == "original" and cfg.quant.is_4bit else "")
        out["warning"] = (f"merged model agrees with the adapter on only {agreement:.1%} of greedy tokens "
                          f"(merge.parity_threshold={m.parity_threshold}); max |logit diff| {worst:.3g}.{hint}")
        log.warning("PARITY WARNING: %s", out["warning"])
    log.info("parity: agreement %.4f, max |logit diff| %.3g, identical outputs %d/%d", agreement, worst,
             out["identical_greedy_outputs"], len(prompts))
    return out


def parity_summary(merged_dir) -> dict:
    """The fields of <merged>/parity.json a run summary carries: ok, agreement, identical outputs, warning."""
    import json
    from pathlib import Path

    report = json.loads((Path(merged_dir) / "parity.json").read_text(encoding="utf-8"))
    keys = ("ok", "greedy_token_agreement", "identical_greedy_outputs", "prompts", "max_abs_logit_diff", "warning")
    out = {k: report.get(k) for k in keys}
    out["base"] = report.get("merge", {}).get("base")
    if out["ok"] is None:  # merge.parity_prompts=0: nothing was compared, nothing failed
        out["ok"] = True
    return out
