#!/usr/bin/env python
"""One-command GPU benchmark for a Qwen2.5-3B-shape QLoRA run: no download, no network, under 8 minutes on one H200.

    python benchmarks/gpu.py --out gpu_bench.json                              # the GPU run
    python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu_bench.json     # CPU smoke, 2 layers, < 60 s

Sections, each time-boxed and recorded as ok or skipped-with-reason so one failure keeps the other figures:
  setup        random-weight model from Qwen2Config in bf16, saved as safetensors to a temp dir and reloaded
               through BitsAndBytesConfig (nf4 + double quant: transformers' own quantizing path), LoRA r=16 all-linear
  train_<T>    QLoRA steps on one packed row of T tokens (padding-free: concatenated sequences, per-sequence
               position_ids, first token of each sequence not a label): label tokens/s, peak memory, MFU
  decode       LoRA merged into a bf16 copy, greedy generate with KV cache, fixed new tokens: tokens/s at batch 1, 16
  fsdp_smoke   torch FSDP2 `fully_shard` at world size 1 (env rendezvous), a few steps on a small LoRA model
  decode_static  (GPU, only with time left) static cache + torch.compile decode at batch 1
The JSON is rewritten after every section and printed as the last stdout line.
MFU = tokens/s * 4 * N / peak FLOP/s: forward 2N + backward 2N per token (frozen base: input grads only);
N counts the tied embedding once (the lm_head matmul); attention scores and checkpoint recompute are not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # finetune.train.memory_plan, for the planned figure

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True)
TARGETS = {"label_tokens_per_s": 30_000, "peak_mem_gib": 8.0, "decode_tokens_per_s_b1": 150}
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="2-layer shape, fp32 on CPU: a smoke run of every section")
    p.add_argument("--quant", default="nf4", choices=("nf4", "none"), help="none: LoRA on the unquantized base")
    p.add_argument("--seq-lens", default=None, help="packed tokens per micro-batch (default 2048,8192; tiny 128,512)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per length (default 8; tiny 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default 128; tiny 8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H200: ~790 per issue)")
    p.add_argument("--attn", default=None, help="attn_implementation (default flash_attention_2 if installed, else sdpa)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp-smoke", default="auto", choices=("auto", "on", "off"), help="auto: run it if time is left")
    p.add_argument("--time-budget-s", type=float, default=450.0, help="whole run; sections beyond it are skipped")
    a = p.parse_args(argv)
    a.seq_lens = [int(s) for s in (a.seq_lens or ("128,512" if a.tiny else "2048,8192")).split(",")]
    a.steps = a.steps or (2 if a.tiny else 8)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 128)
    a.prompt_len = min(a.prompt_len, 16) if a.tiny else a.prompt_len
    return a


class Bench:
    """Holds the results, writes them after every section, and time-boxes each section with SIGALRM."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0, self.out = args, time.time(), Path(args.out)
        self.result: dict = {"sections": {}, "targets": TARGETS, "checks": {}}

    def left(self) -> float:
        return self.args.time_budget_s - (time.time() - self.t0)

    @contextlib.contextmanager
    def section(self, name: str, budget_s: float, needs: tuple[str, ...] = ()):
        rec = self.result["sections"].setdefault(name, {})
        missing = [n for n in needs if self.result["sections"].get(n, {}).get("status") != "ok"]
        budget = min(budget_s, self.left())
        if missing or budget < 5:
            rec.update(status="skipped", reason=f"needs {missing}" if missing else "time budget spent")
            yield None
            return

        def alarm(*_):
            raise TimeoutError(f"section {name} ran past its {budget:.0f} s box")

        start, old = time.time(), signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(budget)))
        try:
            yield rec
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 -- a failed section is recorded, the others still run
            rec.update(status="skipped", reason=f"{type(e).__name__}: {e}"[:500])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            rec["seconds"] = round(time.time() - start, 2)
            self.write()

    def write(self) -> None:
        self.result["total_s"] = round(time.time() - self.t0, 2)
        summary = {}
        for name, rec in self.result["sections"].items():
            for key in ("label_tokens_per_s", "peak_mem_gib", "planned_peak_gib", "mfu"):
                if name.startswith("train_") and key in rec:
                    summary[f"{key}@{name[6:]}"] = rec[key]
            for batch in ("batch_1", "batch_16"):
                if name.startswith("decode") and batch in rec:
                    summary[f"{name}_tokens_per_s@{batch}"] = rec[batch]["tokens_per_s"]
        summary["fsdp_smoke_ok"] = self.result["sections"].get("fsdp_smoke", {}).get("ok", False)
        self.result["summary"] = summary
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)  # atomic: a killed run leaves the last complete JSON


def report(label: str, value: float, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else f"  (target {target}: {'PASS' if ok else 'MISS'})"
    print(f"{label:42s} {value:14,.2f}{verdict}", flush=True)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def packed_row(total: int, vocab: int, device: str, seed: int) -> dict:
    """One padding-free row: random-length sequences with restarting position_ids, as trl's bfd packing makes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mean = max(8, min(512, total // 4))
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(mean // 2, 2 * mean, (1,), generator=g)), total - sum(lengths)))
    ids = torch.randint(0, vocab, (1, total), generator=g)
    labels = ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = -100  # the first token of a sequence is not predicted from the previous sequence
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device)}


def setup(b: Bench, rec: dict, state: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from finetune.models.load import prepare_quantized_base

    a, dev = b.args, b.args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # bf16 is 2-3x slower than fp32 on CPU
    arch = TINY if a.tiny else QWEN25_3B
    attn = a.attn or ("flash_attention_2" if dev == "cuda" and _has("flash_attn") else "sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**arch), dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding once
    model.save_pretrained(state["tmp"])  # safetensors; reloading through BitsAndBytesConfig quantizes on load
    del model
    gc.collect()
    kw: dict = {"dtype": dtype, "device_map": dev, "attn_implementation": attn}
    if a.quant == "nf4":
        kw["dtype"] = "auto"  # as finetune.models.load.load_base_model: the checkpoint's own dtype
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = Qwen2ForCausalLM.from_pretrained(state["tmp"], **kw)
    ckpt = not a.no_gradient_checkpointing
    if a.quant == "nf4":  # the project's k-bit preparation: base frozen, norms fp32, the 16-bit table kept
        prepare_quantized_base(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # the loss as the project's trainer computes it: trl's fused head scores the vocabulary in tiles
    add_fused_lm_head(model)
    state["lora_config"] = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                      task_type="CAUSAL_LM")
    model = get_peft_model(model, state["lora_config"])
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.update(model=model, dtype=dtype, arch=arch, n_params=n_params, attn=attn, ckpt=ckpt)
    rec.update(params=n_params, lora_params=n_lora, quant=a.quant, attn_implementation=attn,
               compute_dtype=str(dtype).replace("torch.", ""), gradient_checkpointing=ckpt,
               weights_gib=(torch.cuda.memory_allocated() / GIB) if dev == "cuda" else None,
               planned_weights_gib=planned_gib(state, 1, "weights"))
    report("base params", n_params)
    report("LoRA params", n_lora)


def train(b: Bench, rec: dict, state: dict, tokens: int) -> None:
    import torch

    a, dev, model = b.args, b.args.device, state["model"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    batches = [packed_row(tokens, state["arch"]["vocab_size"], dev, seed=i) for i in range(2)]
    labels_per_step = [int((x["labels"][0, 1:] != -100).sum()) for x in batches]  # after the shift

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(**batch, use_cache=False, fused_lm_head=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(2):  # warm-up: kernels, allocator, optimizer state
        step(batches[i % 2])
    sync(dev)
    start, losses, labels = time.perf_counter(), [], 0
    for i in range(a.steps):
        losses.append(step(batches[i % 2]))
        labels += labels_per_step[i % 2]
    sync(dev)
    dt = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # CPU: process-lifetime RSS
    tok_s = tokens * a.steps / dt
    mfu = tok_s * 4 * state["n_params"] / (a.peak_tflops * 1e12)
    rec.update(tokens_per_step=tokens, steps=a.steps, step_s=dt / a.steps, tokens_per_s=tok_s,
               label_tokens_per_s=labels / dt, peak_mem_gib=peak,
               peak_mem_source="torch.cuda.max_memory_allocated" if dev == "cuda" else "ru_maxrss",
               mfu=mfu, loss=float(losses[-1]), planned_peak_gib=planned_gib(state, tokens))
    print(f"-- train, {tokens} packed tokens per micro-batch")
    report("label tokens/s", rec["label_tokens_per_s"], ">= 30,000", rec["label_tokens_per_s"] >= 30_000)
    report("peak memory GiB", peak, "<= 8 GiB", peak <= 8.0)
    report("planned memory GiB (finetune.train.memory_plan)", rec["planned_peak_gib"] or 0.0)
    report(f"MFU % vs {a.peak_tflops:g} TFLOP/s (4N FLOPs/token)", 100 * mfu)
    b.result["checks"][f"label_tokens_per_s@{tokens} >= 30000"] = rec["label_tokens_per_s"] >= 30_000
    b.result["checks"][f"peak_mem_gib@{tokens} <= 8"] = peak <= 8.0


def planned_gib(state: dict, tokens: int, part: str = "total") -> float | None:
    """finetune.train.memory_plan's figure for this run (`total`, or `weights` + LoRA params), for comparison."""
    try:
        from finetune.train.memory_plan import plan_memory

        plan = plan_memory({**state["arch"], "qkv_bias": True}, quant_method=state["quant"], double_quant=True,
                           compute_dtype="bfloat16" if state["dtype"] is not None and "bfloat16" in str(state["dtype"])
                           else "float32", r=16, target_modules="all-linear", optimizer="adamw_torch_fused",
                           seq_len=tokens, micro_batch=1, gradient_checkpointing=state["ckpt"], lora_dropout=0.05,
                           attn_implementation=state["attn"] if state["attn"] != "flex_attention" else "sdpa")
        return (plan.total if part == "total" else plan.weights + plan.lora_params) / GIB
    except Exception:  # noqa: BLE001 -- the plan is a comparison figure, never a reason to lose the run
        return None


def decode(b: Bench, rec: dict, state: dict) -> None:
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import Qwen2ForCausalLM

    a, dev = b.args, b.args.device
    lora = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(state.pop("model")).items()}
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    base = Qwen2ForCausalLM.from_pretrained(state["tmp"], dtype=state["dtype"], device_map=dev,
                                            attn_implementation="sdpa")
    adapted = get_peft_model(base, state["lora_config"])
    set_peft_model_state_dict(adapted, lora)
    merged = adapted.merge_and_unload().eval()
    merged.generation_config.eos_token_id = None  # random weights: never stop early, always a fixed length
    merged.generation_config.pad_token_id = 0
    state["merged"] = merged
    for batch in (1, 16):
        tok_s = generate_tokens_per_s(merged, batch, a.prompt_len, a.new_tokens, state["arch"]["vocab_size"], dev)
        rec[f"batch_{batch}"] = {"tokens_per_s": tok_s, "new_tokens": a.new_tokens, "prompt_len": a.prompt_len}
        label = f"merged {str(state['dtype']).replace('torch.', '')} decode tokens/s, batch {batch}"
        if batch == 1:
            report(label, tok_s, ">= 150", tok_s >= 150)
        else:
            report(label, tok_s)
    b.result["checks"]["decode_tokens_per_s@b1 >= 150"] = rec["batch_1"]["tokens_per_s"] >= 150


def generate_tokens_per_s(model, batch: int, prompt_len: int, new: int, vocab: int, dev: str, **gen) -> float:
    import torch

    ids = torch.randint(0, vocab, (batch, prompt_len), device=dev)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, **gen)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new, **kw)  # warm-up at the timed length (a static cache compiles)
        sync(dev)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        sync(dev)
    made = out.shape[1] - prompt_len
    assert made == new, f"generated {made} tokens, expected {new}"
    return batch * made / (time.perf_counter() - start)


def fsdp_smoke(b: Bench, rec: dict) -> None:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = b.args.device
    with socket.socket() as s:  # a free port for the single-rank rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if dev == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        shape = {**TINY, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "head_dim": 64}
        with torch.device(dev):
            model = Qwen2ForCausalLM(Qwen2Config(**(TINY if b.args.tiny else shape)))
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
        mesh = init_device_mesh(dev, (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dev == "cuda" else None
        kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), device=dev)
        losses = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
    finally:
        dist.destroy_process_group()
    ok = all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    rec.update(ok=bool(ok), loss=losses[-1], first_loss=losses[0], steps=len(losses), backend=backend, world_size=1,
               wrapper="torch.distributed.fsdp.fully_shard (FSDP2) per decoder layer + root")
    report("FSDP smoke loss (first -> last)", losses[-1], f"falls from {losses[0]:.3f}", ok)
    b.result["checks"]["fsdp_smoke ok"] = bool(ok)


def decode_static(b: Bench, rec: dict, state: dict) -> None:
    """Batch-1 decode with a static KV cache, which transformers' generate compiles with torch.compile."""
    tok_s = generate_tokens_per_s(state["merged"], 1, b.args.prompt_len, b.args.new_tokens,
                                  state["arch"]["vocab_size"], b.args.device, cache_implementation="static")
    rec.update(batch_1={"tokens_per_s": tok_s})
    report("merged decode tokens/s, batch 1, static+compile", tok_s, ">= 150", tok_s >= 150)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    b = Bench(args)
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU: use --tiny --device cpu for the smoke run")
    b.result.update(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                    transformers=transformers.__version__, shape="tiny" if args.tiny else "qwen2.5-3b",
                    peak_tflops=args.peak_tflops, mfu_formula="tokens_per_s * 4 * params / (peak_tflops * 1e12)")
    state: dict = {"tmp": tempfile.mkdtemp(prefix="gpu_bench_"), "quant": args.quant, "dtype": None}
    try:
        with b.section("setup", 240) as rec:
            if rec is not None:
                setup(b, rec, state)
        for tokens in args.seq_lens:
            with b.section(f"train_{tokens}", 90, needs=("setup",)) as rec:
                if rec is not None:
                    train(b, rec, state, tokens)
        with b.section("decode", 120, needs=("setup",)) as rec:
            if rec is not None:
                decode(b, rec, state)
        if args.fsdp_smoke == "on" or (args.fsdp_smoke == "auto" and b.left() > 60):
            with b.section("fsdp_smoke", 90) as rec:
                if rec is not None:
                    fsdp_smoke(b, rec)
        else:
            b.result["sections"]["fsdp_smoke"] = {"status": "skipped", "reason": "off or less than 60 s left"}
        if args.device == "cuda" and b.left() > 90:
            with b.section("decode_static", b.left() - 10, needs=("decode",)) as rec:
                if rec is not None:
                    decode_static(b, rec, state)
    finally:
        shutil.rmtree(state["tmp"], ignore_errors=True)
        b.write()
    print(json.dumps(b.result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
