"""Peak resident memory of a few QLoRA (nf4) training steps vs 16-bit LoRA, on a Qwen2.5-0.5B-shape model (CPU).

    python benchmarks/memory.py                    # 3 steps per arm at 64, 512 and 2,048 tokens
    python benchmarks/memory.py --quick            # make bench: SmolLM2-135M's shape, 1 step per arm at each size
    python benchmarks/memory.py --size tiny        # smoke run (tests): a 2-layer shape, seconds
    python benchmarks/memory.py --size qwen2.5-3b  # 3B shape: a 6 GB checkpoint, about 10 minutes here

Builds a random model of Qwen2.5-0.5B's shape (hidden 896, intermediate 4864, 24 layers, 14/2 heads, vocab
151,936, tied embeddings; 494 M parameters; --quick: SmolLM2-135M's Llama shape, 30 layers, hidden 576, vocab
49,152) in bf16, like the published checkpoint, and saves it once as
safetensors. Then one fresh process per arm, at each sequence length in turn, loads it through the project's
`finetune.models.load.load_base_model` and trains it with the project's own trainer
(`finetune.train.trainer.build_trainer`: LoRA r16 on all linear layers, fp32 adapter weights, AdamW, trl's
padding-free packing and fused loss head) for a few optimizer steps of one packed row each:

  qlora        quant=nf4 as `finetune train` runs it on this machine: 4-bit weights, fp32 compute on CPU, the
               frozen tied embedding kept in the checkpoint's bf16 (finetune.models.load.prepare_quantized_base)
  qlora_bf16   the same with quant.compute_dtype=bfloat16, the compute dtype a GPU run uses
  lora16       quant=none with bf16 weights and bf16 compute: "16-bit LoRA" (on CPU bf16 stands in for the
               GPU's 16-bit storage; the bytes are the same). transformers memory-maps the safetensors file
               and uses bf16 weights in place, so they count as file-backed resident pages once touched.
  stock_qlora  stock peft + trl, as their docs show it: `from_pretrained` with a BitsAndBytesConfig (nf4, double
               quantization, bf16 compute), peft's `prepare_model_for_kbit_training` (which widens the frozen
               embedding table to fp32), a plain trl SFTTrainer (bf16, LoRA r16 all-linear). Gradient
               checkpointing is off as in the project's CPU default (trl's default would turn it on and
               measure a different activation policy, not the loader).

The headline `ratio` is qlora_bf16 / lora16: the same (bf16) compute dtype in both arms, so it measures the 4-bit
storage alone; `ratio_auto_compute` uses the qlora arm (compute_dtype auto: what `finetune train` picks on this
CPU; where auto picks bf16 that arm is qlora_bf16 and runs once), `project_vs_stock` is qlora_bf16 / stock_qlora. Each is reported per sequence length (64, 512 and 2,048
tokens: activations grow with it and the weights' share falls); the headline figures are at the longest one.

Each arm reports, at each length, above the resident memory just before that length's load (the previous
length's model and trainer freed and the heap trimmed; the first length starts right after the imports): the
loading peak, the resident memory after loading (weights copied out of the memory-mapped checkpoint, see
`materialize`), and the peak of the whole run (`peak`). Peaks are VmHWM, reset between phases through
/proc/self/clear_refs; a thread also samples anonymous memory (RssAnon) every 2 ms, because VmRSS counts the
safetensors file's pages while they are memory-mapped, which the kernel can drop at any time. A 4-bit load
passes the check when its anonymous loading peak stays below one bf16 copy of the model. The arms run with
MALLOC_MMAP_THRESHOLD_=65536 (see MALLOC_ENV), so RSS follows live tensors rather than the heap's history.
The last line printed is one JSON object: the peaks and ratios at the longest sequence, `by_seq_len` for every
length. Goal: ratio <= 0.5.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    # the first target, for the same comparison where the embedding table is a smaller share (10%)
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936),
    # SmolLM2-135M-Instruct's shape (Llama; the demo's model): make bench's size. Its steps are about 4x cheaper
    # than the 0.5B shape's: on a CPU where bf16 runs at half fp32's speed (Intel Xeon, AVX512-BF16 without AMX,
    # 2026-12-02) one bf16 step of the 0.5B shape at 2,048 tokens took 128-169 s, and three arms compute in bf16.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, head_dim=64),
    # smoke shape: intermediate a multiple of 64 (bitsandbytes' CPU 4-bit blocks)
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
LLAMA_SHAPES = ("smollm2-135m",)
ARMS = {  # arm -> quant group
    "qlora": {"method": "nf4", "compute_dtype": "auto"},
    "qlora_bf16": {"method": "nf4", "compute_dtype": "bfloat16"},
    "lora16": {"method": "none", "compute_dtype": "bfloat16"},
    "stock_qlora": {"method": "nf4", "compute_dtype": "bfloat16"},  # loaded and trained by stock peft + trl
}
SEQ_LENS = (64, 512, 2048)
# glibc's dynamic mmap threshold keeps freed multi-MB buffers (dequantized weights, activations) in the heap:
# two runs of the same arm measured 816 and 1,566 MB after loading. With a fixed threshold every large
# tensor is its own mapping, returned on free, and RSS follows the live tensors (701 MB, repeatably).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MB = 2**20


class Memory:
    """This process's resident memory in MB: current, peak since the last `reset`, and sampled anonymous peak."""

    def __init__(self):
        self.anon_peak = 0.0
        self._stop = threading.Event()
        # reset() and the sampler take turns: without it a sample read before a reset could write the last
        # phase's peak back after it (one process runs every length of an arm, so that peak is a real number)
        self._lock = threading.Lock()
        self.can_reset = os.access("/proc/self/clear_refs", os.W_OK)
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def status() -> dict[str, float]:
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024
                for k in ("VmRSS", "VmHWM", "RssAnon")}

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            with self._lock:
                self.anon_peak = max(self.anon_peak, self.status()["RssAnon"])

    def reset(self) -> dict[str, float]:
        """Start a new phase: VmHWM back to the current RSS (Linux >= 4.0), the anonymous peak too."""
        with self._lock:
            if self.can_reset:
                Path("/proc/self/clear_refs").write_text("5")
            now = self.status()
            self.anon_peak = now["RssAnon"]
        return now


def build(root: Path, shape: str) -> None:
    """Random bf16 model of `shape`, saved as safetensors under root/model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 like the published checkpoint: 1 GB, not 2
    if shape in LLAMA_SHAPES:
        config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=8192,
                             rope_theta=100_000.0, rms_norm_eps=1e-5)
        LlamaForCausalLM(config).save_pretrained(root / "model")
        return
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    Qwen2ForCausalLM(config).save_pretrained(root / "model")


def measure(arm: str, root: Path, steps: int, seq_lens: list[int]) -> list[dict]:
    """Load + `steps` optimizer steps of the project's trainer at each of `seq_lens`, in this one process: one
    process per arm instead of one per arm and length saves the imports (about 9 s a process) and the
    interpreter start of 8 of make bench's 12 processes. Each length loads the model afresh and measures above
    the resident memory it starts from, after the previous length's model and trainer are freed and the heap
    is trimmed (`_release`)."""
    import bitsandbytes  # noqa: F401  (every arm pays the same imports before the baseline is read)
    import peft  # noqa: F401
    import trl  # noqa: F401

    mem = Memory()
    after_imports = mem.status()["VmRSS"]
    out = []
    for seq_len in seq_lens:
        out.append({**measure_one(arm, root, steps, seq_len, mem), "after_imports_mb": round(after_imports)})
        _release()
    return out


def _release() -> None:
    """Free the last length's model and trainer and hand the heap's free pages back (malloc_trim), so the next
    length starts from the same resident memory as a fresh process would after loading nothing."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the next length measures above what is left
        pass


def measure_one(arm: str, root: Path, steps: int, seq_len: int, mem: "Memory") -> dict:
    """Load + `steps` optimizer steps at one length; MB above the resident memory just before loading."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from finetune.config import to_typed
    from finetune.data import DataSplits
    from finetune.models.load import load_base_model, resolve_dtype
    from finetune.models.tiny import load_tiny_tokenizer
    from finetune.train.trainer import build_trainer

    cfg = to_typed({
        "model": {"name_or_path": str(root / "model")}, "quant": ARMS[arm], "device": "cpu",
        "data": {"max_length": seq_len},
        # one packed row of seq_len tokens per optimizer step; nothing saved until the last step
        "train": {"max_steps": steps, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                  "save_steps": 10**6, "logging_steps": 1, "report_to": [], "warmup_steps": 0},
    })
    vocab = json.loads((root / "model" / "config.json").read_text())["vocab_size"]
    # random token ids for a random model; the embedded tokenizer only supplies the pad token to the collator
    ids = torch.randint(0, vocab, (steps, seq_len), generator=torch.Generator().manual_seed(0)).tolist()
    splits = DataSplits(Dataset.from_dict({"input_ids": ids, "assistant_masks": [[1] * seq_len] * steps}), None, {})
    tokenizer = load_tiny_tokenizer()
    base = mem.reset()
    started = time.perf_counter()
    model = stock_load(root) if arm == "stock_qlora" else load_base_model(cfg.model, cfg.quant, "cpu")
    load_s = time.perf_counter() - started
    load_peak, load_anon = mem.status()["VmHWM"], mem.anon_peak
    copied = materialize(model, root / "model")
    loaded = mem.status()
    mem.reset()
    if arm == "stock_qlora":
        trainer = stock_trainer(model, splits.train, tokenizer, steps, seq_len, root / f"run-{arm}-{seq_len}")
    else:
        trainer = build_trainer(cfg, splits, tokenizer, root / f"run-{arm}-{seq_len}", "cpu", model=model)
    seen = {}

    class Peak(TrainerCallback):  # read before the end-of-run checkpoint is written
        def on_step_end(self, args, state, control, **kw):
            now = mem.status()
            seen.update(hwm=max(seen.get("hwm", 0), now["VmHWM"]), anon=max(seen.get("anon", 0), mem.anon_peak))

    trainer.add_callback(Peak())
    started = time.perf_counter()
    trainer.train()
    steps_s = time.perf_counter() - started
    embed = trainer.model.get_input_embeddings()
    embed = getattr(embed, "base_layer", embed)
    return {
        "arm": arm, "quant": cfg.quant.method, "seq_len": seq_len,
        "compute_dtype": str(resolve_dtype(cfg.quant.compute_dtype, "cpu")).replace("torch.", ""),
        "embedding_dtype": str(embed.weight.dtype).replace("torch.", ""),
        "before_load_mb": round(base["VmRSS"]),
        "load_peak_mb": round(load_peak - base["VmRSS"]),
        "load_peak_anon_mb": round(load_anon - base["RssAnon"]),
        "loaded_mb": round(loaded["VmRSS"] - base["VmRSS"]),
        "loaded_anon_mb": round(loaded["RssAnon"] - base["RssAnon"]), "copied_from_mapping_mb": copied,
        "train_peak_mb": round(seen["hwm"] - base["VmRSS"]),
        "train_peak_anon_mb": round(seen["anon"] - base["RssAnon"]),
        "load_s": round(load_s, 1), "step_s": round(steps_s / steps, 1),
        "losses": [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r],
        "peak_reset": mem.can_reset,
    }


def stock_load(root: Path):
    """The QLoRA loading of peft's and trl's docs: nf4 + double quantization, bf16 compute, peft's k-bit prep."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(root / "model", quantization_config=bnb, device_map="cpu")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def stock_trainer(model, train, tokenizer, steps: int, seq_len: int, out: Path):
    """A plain trl SFTTrainer over `train` (one row of seq_len tokens per step), LoRA r16 on all linear layers."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1, max_length=seq_len,
                     bf16=True, use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                     report_to="none", warmup_steps=0)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def materialize(model, checkpoint: Path) -> int:
    """Copy the weights that still live in the memory-mapped checkpoint into process memory, as a copy to GPU
    memory would; return the MB copied. transformers uses bf16 tensors of a bf16 checkpoint in place: their
    pages count in VmRSS only once touched, and every page read while loading stays counted while any tensor
    keeps the mapping open (700 MB for an nf4 model whose only in-place tensor is the 272 MB embedding).
    Tensors already in process memory are left alone (copying them would add a transient peak)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(checkpoint.resolve()) in line:
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    copied = 0
    for p in model.parameters():
        if any(lo <= p.data_ptr() < hi for lo, hi in ranges):
            p.data = p.data.clone()
            copied += p.numel() * p.element_size()
    return round(copied / MB)


def model_bytes(root: Path) -> int:
    """Bytes of the saved checkpoint's tensors (bf16: one 16-bit copy of the model)."""
    from safetensors import safe_open

    total = 0
    for f in (root / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * 2
    return total


def run(cmd: list[str], what: str) -> str:
    env = {**MALLOC_ENV, **os.environ}  # a threshold set by the caller wins
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"memory: {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="make bench: 1 step per arm at each sequence length")
    p.add_argument("--size", choices=tuple(SHAPES), default=None,
                   help="model shape (default qwen2.5-0.5b; with --quick smollm2-135m)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 3; quick 1)")
    p.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)),
                   help="comma-separated tokens in the one training row of each step (default 64,512,2048)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--bf16-max-len", type=int, default=None,
                   help="run the bf16 arms only up to this many tokens (default: no cap; with --quick on a CPU "
                        "without native bf16, 512)")
    p.add_argument("--keep", type=Path, help="build the model here and keep it (reused when already built)")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: build, or one arm per fresh process
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (1 if a.quick else 3)
    a.size = a.size or ("smollm2-135m" if a.quick else "qwen2.5-0.5b")
    try:
        a.seq_lens = [int(x) for x in a.seq_lens.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seq-lens={a.seq_lens}: comma-separated integers, e.g. 64,512,2048")
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown or not {"qlora_bf16", "lora16"} <= set(a.arms):
        p.error(f"--arms={','.join(a.arms)}: use arms from {', '.join(ARMS)}, including qlora_bf16 and lora16 "
                "(the ratio compares them at the same compute dtype)")
    if a.steps < 1 or not a.seq_lens or min(a.seq_lens) < 2:
        p.error(f"--steps must be >= 1 and every --seq-lens value >= 2; got {a.steps} and {a.seq_lens}")
    return a


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.phase == "build":
        build(args.root, args.size)
        return None
    if args.phase:
        arm, lens = args.phase.split("@")
        print(json.dumps(measure(arm, args.root, args.steps, [int(n) for n in lens.split(",")])))
        return None
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    me = [sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--size", args.size,
          "--steps", str(args.steps), "--phase"]
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "model" / "config.json").is_file():
            started = time.perf_counter()
            run(me + ["build"], "building the random model")
            print(f"built the random {args.size}-shape model in {time.perf_counter() - started:.0f} s", flush=True)
        copy16 = model_bytes(root) / MB
        if "qlora" in args.arms and "qlora_bf16" in args.arms and auto_compute_dtype() == "bfloat16":
            # compute_dtype=auto picks bf16 on this CPU: the qlora arm would be the qlora_bf16 arm run again
            # (3 of the 12 processes of `--quick`, about 140 s of make bench, 2026-12-02)
            args.arms = [a for a in args.arms if a != "qlora"]
            args.auto_is_bf16 = True
            print("compute_dtype auto -> bfloat16 here: the qlora arm is qlora_bf16, measured once", flush=True)
        by_len = {n: {} for n in args.seq_lens}
        args.skipped = {}
        cap = bf16_length_cap(args)
        if cap is not None and cap < min(args.seq_lens):
            raise SystemExit(f"memory: the bf16 arms run only up to {cap} tokens, below every --seq-lens value "
                             f"({','.join(map(str, args.seq_lens))}): nothing to compare; add a length <= {cap} "
                             f"or raise --bf16-max-len")
        for arm in args.arms:  # one fresh process per arm, every length in it
            wanted = [n for n in args.seq_lens if cap is None or ARMS[arm]["compute_dtype"] != "bfloat16" or n <= cap]
            for n in sorted(set(args.seq_lens) - set(wanted)):
                args.skipped.setdefault(str(n), []).append(arm)
            if not wanted:
                continue
            lens = ",".join(map(str, wanted))
            out = run(me + [f"{arm}@{lens}"], f"the {arm} arm at {lens} tokens")
            for r in json.loads(out.strip().splitlines()[-1]):
                by_len[r["seq_len"]][arm] = r
                print(f"  {json.dumps(r)}", flush=True)
        return report(by_len, copy16, args)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


# On a CPU without native bf16 (AVX2 only) bf16 is emulated: on an AMD EPYC (2026-12-02) one bf16 step of the
# SmolLM2 shape took 14 s at 64 tokens and 109 s at 512, and 2,048 tokens would take some 8 minutes per arm,
# three arms (qlora_bf16, lora16, stock_qlora) over make bench's whole budget. There --quick measures the bf16
# arms up to this length and says so; memory does not depend on the CPU's speed, so the 2,048-token figures of a
# CPU with native bf16 stand (README).
EMULATED_BF16_QUICK_MAX_LEN = 512


def bf16_length_cap(args) -> int | None:
    """The longest sequence the bf16 arms run at: --bf16-max-len, else 512 under --quick on a CPU without native
    bf16, else no cap."""
    if args.bf16_max_len is not None:
        return args.bf16_max_len
    if not args.quick:
        return None
    from finetune.models.cpu import detect_features

    features = detect_features()
    if features.native_bf16:
        return None
    longer = [n for n in args.seq_lens if n > EMULATED_BF16_QUICK_MAX_LEN]
    if longer:
        print(f"WARNING: {features.model or 'this CPU'} has no native bf16 (torch capability {features.capability}): "
              f"the bf16 arms run at most {EMULATED_BF16_QUICK_MAX_LEN} tokens (not {','.join(map(str, longer))}); "
              f"--bf16-max-len 2048 runs them anyway (about 8 minutes per arm at 2,048 tokens on an AVX2 EPYC)",
              flush=True)
    return EMULATED_BF16_QUICK_MAX_LEN


def auto_compute_dtype() -> str:
    """What quant.compute_dtype=auto resolves to on this CPU (finetune.models.cpu's check, cached per CPU model)."""
    from finetune.models.load import resolve_dtype

    return str(resolve_dtype("auto", "cpu")).replace("torch.", "")


def ratios(arms: dict, copy16: float, auto_is_bf16: bool = False) -> dict:
    """Peaks and ratios of one sequence length (a length where the bf16 arms were skipped has the qlora arm's
    figures only)."""
    if "qlora_bf16" not in arms or "lora16" not in arms:
        return _qlora_figures(arms["qlora"], copy16) if "qlora" in arms else {}
    q16, l16 = arms["qlora_bf16"], arms["lora16"]
    if auto_is_bf16 and "qlora" not in arms:
        arms = {**arms, "qlora": q16}
    out = {"qlora_bf16_peak_mb": peak(q16), "lora16_peak_mb": peak(l16), "ratio": round(peak(q16) / peak(l16), 2)}
    if "qlora" in arms:
        out.update(_qlora_figures(arms["qlora"], copy16), ratio_auto_compute=round(peak(arms["qlora"]) / peak(l16), 2))
    if "stock_qlora" in arms:
        out.update(stock_qlora_peak_mb=peak(arms["stock_qlora"]),
                   project_vs_stock=round(peak(q16) / peak(arms["stock_qlora"]), 2),
                   stock_embedding_dtype=arms["stock_qlora"]["embedding_dtype"])
    return out


def _qlora_figures(q: dict, copy16: float) -> dict:
    return {"qlora_peak_mb": peak(q), "qlora_compute_dtype": q["compute_dtype"],
            "qlora_load_peak_anon_mb": q["load_peak_anon_mb"],
            "qlora_load_below_bf16_copy": q["load_peak_anon_mb"] < copy16}


def report(by_len: dict, copy16: float, args) -> dict:
    print(f"model: {args.size} shape, random, one bf16 copy = {copy16:.0f} MB; {args.steps} steps of one row per "
          f"arm; MB above the resident memory before each load")
    print(f"{'tokens':>6s} {'arm':12s} {'compute':>8s} {'load peak':>9s} {'(anon)':>7s} {'loaded':>7s} {'run peak':>8s} "
          f"{'steps anon':>10s} {'load s':>6s} {'step s':>6s}")
    for seq_len, arms in by_len.items():
        for r in arms.values():
            print(f"{seq_len:6d} {r['arm']:12s} {r['compute_dtype']:>8s} {r['load_peak_mb']:9d} "
                  f"{r['load_peak_anon_mb']:7d} {r['loaded_mb']:7d} {peak(r):8d} {r['train_peak_anon_mb']:10d} "
                  f"{r['load_s']:6.1f} {r['step_s']:6.1f}")
    per_len = {str(n): ratios(arms, copy16, getattr(args, "auto_is_bf16", False)) for n, arms in by_len.items()}
    compared = [n for n in by_len if "ratio" in per_len[str(n)]]
    longest = str(max(compared))  # the headline: the longest length both ratio arms ran at
    result = {"size": args.size, "steps": args.steps, "seq_len": int(longest), "bf16_copy_mb": round(copy16),
              **per_len[longest], "ratio_max": max(per_len[str(n)]["ratio"] for n in compared), "by_seq_len": per_len}
    if getattr(args, "skipped", None):
        result["skipped"] = args.skipped  # {length: [arms not run there]} (see bf16_length_cap)
    goals = {"ratio<=0.5": result["ratio"] <= 0.5}
    if "qlora_load_below_bf16_copy" in result:
        goals["4-bit load below one bf16 copy"] = result["qlora_load_below_bf16_copy"]
    result["goals_met"] = goals
    result["details"] = [r for arms in by_len.values() for r in arms.values()]
    print(json.dumps(result))
    return result


def peak(r: dict) -> int:
    """Peak of the whole run: loading (anonymous memory: the checkpoint file's pages, mapped while loading, are
    page cache, not memory the model needs), the loaded model, or the steps (all resident memory)."""
    return max(r["load_peak_anon_mb"], r["loaded_mb"], r["train_peak_mb"])


if __name__ == "__main__":
    main()
