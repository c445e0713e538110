"""Eval generation against llama.cpp: the project's batched greedy decoding of the real SmolLM2-135M-Instruct
against llama.cpp (llama-cpp-python) single-stream on the GGUF the project exports, on the same prompts.

    python benchmarks/generate_engines.py                       # 32 held-out demo prompts, 64 new tokens
    python benchmarks/generate_engines.py --model-dir outputs/demo/<time>/merged --rows 70
    python benchmarks/generate_engines.py --quants f16,q8_0     # llama.cpp arms (the best one is the baseline)

Arms, one process, run one after the other on the same token ids (the demo's held-out prompts rendered by
the chat template, so both engines see identical prompts):
  project_b1       finetune.generate.generate, batch 1 (transformers generate, KV cache); --b1-rows N runs
                   it on the first N prompts only
  project_batched  the same, all prompts in batches of --batch-size (what `finetune eval` does)
  llamacpp_<q>     llama-cpp-python on the exported GGUF of quant q, one prompt at a time (its server's
                   single-stream path), n_threads = physical cores, greedy (temperature 0)
Each arm decodes greedily until the end-of-turn token or --new-tokens. Reported: generated tokens, wall seconds
and tokens/s per arm, and whether greedy outputs agree with the project's. The last line is one JSON object;
`batched_vs_llamacpp_best` is the goal's ratio (issue 16: >= 2). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _prompts(model_dir: Path, rows: int):
    from hydra import compose, initialize_config_dir

    from finetune.config import register_configs, to_typed, validate
    from finetune.data import render_prompt
    from finetune.generate.prompts import held_out_prompts
    from finetune.models.load import load_tokenizer

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = validate(to_typed(compose(config_name="config", overrides=["experiment=demo"])))
    tokenizer = load_tokenizer(cfg.model, str(model_dir))
    held, _ = held_out_prompts(cfg.data, tokenizer, limit=rows)
    return tokenizer, [render_prompt(tokenizer, r.messages) for r in held]


def _project(model, tokenizer, prompts, new_tokens: int, batch_size: int):
    from finetune.generate.generation import generate

    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up (allocations, oneDNN)
    t = time.perf_counter()
    out = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size)
    return time.perf_counter() - t, [g.token_ids for g in out]


def _llamacpp(gguf_path: Path, prompts, new_tokens: int, stops: list[int], threads: int):
    from finetune.export.llamacpp import open_gguf

    llm = open_gguf(gguf_path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    verbose=False)
    outs = []
    t = time.perf_counter()
    for ids in prompts:
        llm.reset()
        got = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in stops:
                break
            got.append(tok)
            if len(got) >= new_tokens:
                break
        outs.append(got)
    return time.perf_counter() - t, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="a merged folder (default: SmolLM2 itself)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--b1-rows", type=int, default=0,
                        help="project_b1 on the first N prompts only (0: all); its tokens/s is a per-token rate")
    parser.add_argument("--dtype", default="auto", help="project compute dtype: auto (the CPU check), bfloat16, float32")
    parser.add_argument("--quants", default="f16,q8_0")
    args = parser.parse_args()
    if args.b1_rows < 0:
        parser.error(f"--b1-rows {args.b1_rows}: give a number of prompts >= 1, or 0 for all of them")

    import torch

    from finetune.export.gguf import plan_gguf, write_gguf
    from finetune.generate.generation import load_merged, stop_token_ids
    from finetune.models.cpu import cpu_dtype_choice
    from finetune.models.gguf import smollm2_model_dir
    from finetune.train.threads import configure_threads, physical_cores

    configure_threads()
    threads = physical_cores()
    dtype = args.dtype
    if dtype == "auto":
        choice = cpu_dtype_choice()
        dtype = choice.dtype
        print(f"project dtype: {dtype} ({choice.reason})", flush=True)
    model_dir = args.model_dir or smollm2_model_dir()
    tokenizer, prompts = _prompts(model_dir, args.rows)
    stops = stop_token_ids(tokenizer)
    result: dict = {"model_dir": str(model_dir), "rows": len(prompts), "new_tokens": args.new_tokens,
                    "threads": threads, "project_dtype": dtype, "torch_threads": torch.get_num_threads()}
    arms: dict[str, tuple[float, list]] = {}
    model = load_merged(model_dir, "cpu", getattr(torch, dtype))
    model = model[0] if isinstance(model, tuple) else model  # loaded once for both project arms
    arms["project_batched"] = _project(model, tokenizer, prompts, args.new_tokens, args.batch_size)
    b1_prompts = prompts[:args.b1_rows] if args.b1_rows > 0 else prompts
    arms["project_b1"] = _project(model, tokenizer, b1_prompts, args.new_tokens, 1)
    del model
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        for quant in [q for q in args.quants.split(",") if q]:
            path = Path(tmp) / f"model-{quant}.gguf"
            write_gguf(plan_gguf(model_dir, quant), path, "bench")
            try:
                arms[f"llamacpp_{quant}"] = _llamacpp(path, prompts, args.new_tokens, stops, threads)
            except ImportError as e:
                result[f"llamacpp_{quant}"] = f"not run: {e} (make test-llamacpp installs llama-cpp-python)"
            path.unlink()
    reference = arms["project_batched"][1]
    print(f"{'arm':18} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'same as batched':>16}")
    for name, (seconds, outs) in arms.items():
        n = sum(len(o) for o in outs)
        same = sum(o == r for o, r in zip(outs, reference))  # project_b1: its first N prompts
        result[f"{name}_tokens"] = n
        result[f"{name}_seconds"] = round(seconds, 2)
        result[f"{name}_tokens_per_s"] = round(n / seconds, 1)
        result[f"{name}_same_outputs"] = f"{same}/{len(outs)}"
        print(f"{name:18} {n:7d} {seconds:8.1f} {n / seconds:9.1f} {same:>10}/{len(outs)}", flush=True)
    llama = [result[f"{k}_tokens_per_s"] for k in arms if k.startswith("llamacpp_")]
    if llama:
        result["llamacpp_best_tokens_per_s"] = max(llama)
        result["batched_vs_llamacpp_best"] = round(result["project_batched_tokens_per_s"] / max(llama), 2)
        result["b1_vs_llamacpp_best"] = round(result["project_b1_tokens_per_s"] / max(llama), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
