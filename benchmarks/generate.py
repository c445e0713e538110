"""Generation speed on the CPU: merged vs unmerged adapter, batched vs one by one, constrained vs not.

    python benchmarks/generate.py [--size small|medium|tiny] [--new-tokens 32] [--repeats 3]

Builds a run the way `finetune train` leaves one (random Qwen2-architecture base with the embedded
tokenizer and ChatML template, a random r=16 all-linear LoRA adapter on its nf4 base), merges it with
`finetune.merge.stream.merge_adapter`, and generates for the 16 structured validation prompts of the demo data
through `finetune.generate.generation.generate` (greedy, KV cache):

  merged vs adapter      merged model (fp32, the CPU default; and bf16) vs the unmerged adapter on its nf4
                         base, as `generate.use_adapter=true` loads it; batch 16. Goal: merged >= 1.5x tokens/s.
  batched vs one by one  merged model (fp32 and bf16), 16 prompts in one length-sorted left-padded batch vs
                         batch_size=1. Goal: >= 5x.
  constrained            merged fp32, batch 16, each row constrained to its schema (finetune.generate.constrained) vs
                         unconstrained, per decoding step (constrained rows may stop early), and the time spent
                         inside the processor (the mask) per step. Goal: at most 25% slower.

The speed arms run exactly --new-tokens steps (stop tokens banned) so every arm does the same work. Each
figure is the best of --repeats rounds, arms interleaved (this machine is shared: other jobs inflated single
runs up to 3x).
Sizes: small (default, ~2 minutes) hidden 512, 4 layers, 8/2 heads, 12 M parameters; medium hidden 1024,
8 layers, 16/2 heads, 89 M parameters (~6 minutes); tiny the embedded 2-layer model. The last line printed
is one JSON object with the figures. Not a test.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SIZES = {  # Qwen2-shaped; intermediate sizes are multiples of 64 (bitsandbytes' CPU 4-bit blocks)
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16),
}


def build_run(root: Path, size: str):
    """(cfg, adapter dir, merged dir): a random base of `size`, a random nf4 LoRA adapter, merged."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finetune.merge.stream import merge_adapter
    from finetune.models.load import load_base_model
    from finetune.config import to_typed
    from finetune.models.tiny import load_tiny_tokenizer, tiny_model_dir

    tok = load_tiny_tokenizer()
    if size == "tiny":
        base = tiny_model_dir()
    else:
        base = root / "base"
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=(len(tok) + 63) // 64 * 64, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, num_key_value_heads=2, head_dim=64,
                             tie_word_embeddings=True, **SIZES[size])
        Qwen2ForCausalLM(config).save_pretrained(base)
        tok.save_pretrained(base)
    cfg = to_typed({"model": {"name_or_path": str(base)}, "quant": {"method": "nf4"}, "device": "cpu",
                    "merge": {"adapter": str(root / "adapter"), "output": str(root / "merged"), "parity_prompts": 0}})
    torch.manual_seed(1)
    qlora = get_peft_model(load_base_model(cfg.model, cfg.quant, "cpu"),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    qlora.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    return cfg, root / "adapter", merge_adapter(cfg, None)


def structured_prompts(tokenizer) -> tuple[list[list[int]], list[dict]]:
    """The demo data's structured validation rows: prompt ids and each row's JSON schema."""
    from hydra import compose, initialize_config_dir

    from finetune.data import build_datasets, render_prompt
    from finetune.paths import CONFIG_DIR
    from finetune.config import register_configs, to_typed

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        data = to_typed(compose("config")).data
    rows = [r for r in build_datasets(data, tokenizer).val if r["task"] == "structured" and r["schema"]]
    return [render_prompt(tokenizer, json.loads(r["messages"])[:-1]) for r in rows], [json.loads(r["schema"])
                                                                                      for r in rows]


def no_stop(tokenizer):
    """A logits_processor_factory that bans the stop tokens, so every row generates exactly max_new_tokens."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from finetune.generate.generation import stop_token_ids

    stops = stop_token_ids(tokenizer)

    class NoStop(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, stops] = float("-inf")
            return scores

    return lambda idx: LogitsProcessorList([NoStop()])


def timed(arms: dict, repeats: int) -> dict:
    """{name: (best seconds, last result)} over `repeats` rounds; each round runs every arm once.

    Round-robin, not arm after arm: the machine is shared, and load that comes and goes then hits every
    arm alike instead of whichever ran at the time. One warm-up call per arm first.
    """
    for fn in arms.values():
        fn()
    best = {name: (float("inf"), None) for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            started = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - started
            best[name] = (min(best[name][0], seconds), out)
    return best


class _Timed:
    """Wraps a logits_processor_factory and adds up the seconds spent inside its processors."""

    def __init__(self, factory):
        self.factory, self.seconds, self.calls = factory, 0.0, 0

    def __call__(self, indices):
        from transformers import LogitsProcessorList

        def timed_call(proc):
            def call(input_ids, scores):
                started = time.perf_counter()
                out = proc(input_ids, scores)
                self.seconds, self.calls = self.seconds + time.perf_counter() - started, self.calls + 1
                return out
            return call

        return LogitsProcessorList([timed_call(p) for p in self.factory(indices)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "medium", "tiny"), default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from finetune.generate.generation import generate, load_merged, schema_processor_factory
    from finetune.models.adapter import load_adapter_model

    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        cfg, adapter_dir, merged_dir = build_run(root, args.size)
        merged, tok = load_merged(merged_dir, "cpu", torch.float32)
        merged_bf16, _ = load_merged(merged_dir, "cpu", torch.bfloat16)
        adapter = load_adapter_model(cfg, adapter_dir, "cpu", quantize=True)
        prompts, schemas = structured_prompts(tok)
        n, fixed = args.new_tokens, no_stop(tok)

        def run(model, batch_size=16, factory=fixed):
            return generate(model, tok, prompts, max_new_tokens=n, batch_size=batch_size,
                            logits_processor_factory=factory)

        total = len(prompts) * n
        constrain = _Timed(schema_processor_factory(tok, schemas, merged.config.vocab_size))
        t = timed({"merged": lambda: run(merged), "bf16": lambda: run(merged_bf16), "adapter": lambda: run(adapter),
                   "single": lambda: run(merged, batch_size=1), "single_bf16": lambda: run(merged_bf16, batch_size=1),
                   "constrained": lambda: run(merged, factory=constrain)}, args.repeats)
        (t_merged, _), (t_bf16, _), (t_adapter, _), (t_single, _) = t["merged"], t["bf16"], t["adapter"], t["single"]
        t_constrained, gens = t["constrained"]
        steps = max(g.new_tokens + g.stopped for g in gens)  # the batch runs until its longest row ends
        ms_free, ms_constrained = 1000 * t_merged / n, 1000 * t_constrained / steps
        mask_ms = 1000 * constrain.seconds / max(constrain.calls, 1)
        result = {
            "size": args.size, "params_m": round(sum(p.numel() for p in merged.parameters()) / 1e6, 1),
            "prompts": len(prompts), "new_tokens": n, "torch_threads": torch.get_num_threads(),
            "merged_fp32_tokens_per_s": round(total / t_merged, 1),
            "merged_bf16_tokens_per_s": round(total / t_bf16, 1),
            "adapter_nf4_tokens_per_s": round(total / t_adapter, 1),
            "merged_vs_adapter": round(t_adapter / t_merged, 2),
            "merged_bf16_vs_adapter": round(t_adapter / t_bf16, 2),
            "one_by_one_tokens_per_s": round(total / t_single, 1),
            "batched_vs_one_by_one": round(t_single / t_merged, 2),
            "batched_vs_one_by_one_bf16": round(t["single_bf16"][0] / t_bf16, 2),
            "unconstrained_ms_per_step": round(ms_free, 2), "constrained_ms_per_step": round(ms_constrained, 2),
            "constrained_slowdown": round(ms_constrained / ms_free - 1, 3),
            "mask_ms_per_step": round(mask_ms, 2), "mask_share_of_step": round(mask_ms / ms_free, 3),
            "constrained_rows_complete": sum(g.stopped for g in gens),
            "constrained_rows_valid": sum(_valid(g.text, s) for g, s in zip(gens, schemas)),
        }
        result["goals_met"] = {"merged_vs_adapter>=1.5": result["merged_vs_adapter"] >= 1.5,
                               "batched_vs_one_by_one>=5": result["batched_vs_one_by_one"] >= 5,
                               "constrained_slowdown<=0.25": result["constrained_slowdown"] <= 0.25}
        for key, value in result.items():
            print(f"{key:28s} {value}")
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _valid(text: str, schema: dict) -> bool:
    from finetune.generate.generation import schema_check

    return schema_check(text, schema)["schema_valid"] == 1.0


if __name__ == "__main__":
    main()
