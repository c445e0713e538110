"""Peak memory of merging a LoRA adapter into a Qwen2.5-0.5B-shape model: streamed (ours) vs in memory (peft).

    python benchmarks/merge_memory.py [--keep DIR]

Builds a random model with Qwen2.5-0.5B's shape (hidden 896, intermediate 4864, 24 layers, 14/2 heads,
vocab 151,936, tied embeddings; 494 M parameters) in bf16, saves it as safetensors shards (like the Hub
checkpoint) with a random r=16 all-linear LoRA adapter, then merges it in fresh processes, one per way:

  streamed_fp32      finetune.merge.stream.merge_weights -> fp32 shards (the CPU default)
  streamed_bf16      the same, bf16 output (the CUDA default)
  nf4_roundtrip      merge.base=nf4_roundtrip: the 4-bit base is loaded as in training, layers dequantized in turn
  peft_in_memory     AutoModelForCausalLM.from_pretrained(fp32) + PeftModel + merge_and_unload + save_pretrained

Each figure is the process's peak resident memory (ru_maxrss) minus its resident memory after imports.
One fp32 copy of the model is 1,976 MB (494 M parameters x 4 bytes). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

QWEN2_5_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6)
MODES = ("streamed_fp32", "streamed_bf16", "nf4_roundtrip", "peft_in_memory")


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(root: Path) -> None:
    """Random bf16 model of Qwen2.5-0.5B's shape + a random LoRA adapter, saved under root."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 like the published checkpoint: 1 GB, not 2
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B))
    model.save_pretrained(root / "base", max_shard_size="400MB")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")


def measure(mode: str, root: Path) -> dict:
    """Run one merge; return its timing and memory figures."""
    import torch

    from finetune.merge.stream import merge_weights, nf4_dequantizer

    out = root / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    baseline = rss_mb()
    started = time.perf_counter()
    if mode == "peft_in_memory":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        PeftModel.from_pretrained(model, str(root / "adapter")).merge_and_unload().save_pretrained(out)
    elif mode == "nf4_roundtrip":
        from finetune.config import to_typed

        cfg = to_typed({"model": {"name_or_path": str(root / "base")}, "quant": {"method": "nf4"}})
        lookup = nf4_dequantizer(cfg, "cpu")
        merge_weights(root / "base", root / "adapter", out, dtype=torch.float32, dequantized=lookup)
    else:
        dtype = torch.bfloat16 if mode == "streamed_bf16" else torch.float32
        merge_weights(root / "base", root / "adapter", out, dtype=dtype)
    seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "seconds": round(seconds, 1), "baseline_mb": round(baseline), "peak_mb": round(peak_mb()),
            "peak_over_baseline_mb": round(peak_mb() - baseline), "written_mb": round(written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the model here and keep it (default: a temp dir)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one measurement per fresh process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "build":
        return build(args.root)
    if args.phase:
        print(json.dumps(measure(args.phase, args.root)))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = [sys.executable, __file__, "--root", str(root), "--phase"]
    try:
        if not (root / "adapter" / "adapter_config.json").is_file():
            started = time.perf_counter()
            subprocess.run(run + ["build"], check=True, env=env)
            print(f"built the random Qwen2.5-0.5B-shape model in {time.perf_counter() - started:.0f} s", flush=True)
        shards = sorted(p.name for p in (root / "base").glob("*.safetensors"))
        results = {}
        for mode in MODES:
            res = subprocess.run(run + [mode], check=True, env=env, capture_output=True, text=True)
            results[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:18s} peak {r['peak_mb']:6d} MB, {r['peak_over_baseline_mb']:6d} MB over the "
                  f"{r['baseline_mb']} MB after imports; wrote {r['written_mb']} MB in {r['seconds']} s", flush=True)
        index = json.loads((root / "base" / "model.safetensors.index.json").read_text())
        fp32_copy_mb = index["metadata"]["total_size"] * 2 / 2**20  # the shards are bf16: 2 bytes a parameter
        print(json.dumps({"model": "Qwen2.5-0.5B shape, random", "base_shards": len(shards),
                          "fp32_copy_mb": round(fp32_copy_mb),
                          **{m: r["peak_over_baseline_mb"] for m, r in results.items()},
                          "streamed_fp32_vs_one_copy": round(results["streamed_fp32"]["peak_over_baseline_mb"]
                                                             / fp32_copy_mb, 2),
                          "details": list(results.values())}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
