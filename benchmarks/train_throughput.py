"""Training throughput on CPU: the project's default path against trl's defaults, trl's best settings and peer
frameworks, side by side on the same model and rows.

    python benchmarks/train_throughput.py                      # SmolLM2-135M-Instruct + Qwen2.5-0.5B shape, 2 repeats
    python benchmarks/train_throughput.py --quick              # make bench: SmolLM2 only, 96 rows, 1 repeat
    python benchmarks/train_throughput.py --models tiny --rows 24 --peers none       # smoke run (tests)
    python benchmarks/train_throughput.py --baseline-set gradient_checkpointing=true # an ablation of the trl arms

Arms (each run is its own subprocess; peers run their own CLI in their own venv, see benchmarks/peers.py):
  trl_default   a stock SFTTrainer as trl ships it: bf16=True, gradient checkpointing on, no packing, micro-batch 8
                padded to its longest row, the peft QLoRA recipe (prepare_model_for_kbit_training)
  trl_best      what a trl user who reads the docs picks: packing=True + padding_free=True (bfd), gradient
                checkpointing off, the compute dtype the project picks on this CPU (finetune.models.cpu),
                micro-batch 1 packed row; otherwise the same recipe
  project       `finetune.train.trainer.train` with the shipped default config (configs/train/default.yaml)
  <peer>        llamafactory, torchtune, litgpt, axolotl: their training CLI with the closest settings; a peer
                that is not installed or does not run on CPU is reported with the reason

All arms: nf4 QLoRA (LoRA r16 all-linear, the project's peft group), the same learning rate, schedule, seed and
optimizer, one epoch over the same rows, the same tokens per optimizer step (the project's micro-batch x
accumulation x data.max_length packed tokens; the unpacked arm gets as many rows as hold about that many tokens).
Rows are user/assistant conversations with log-normal lengths around a median of 200 tokens, max length 2,048.
Runs alternate between arms across repeats (the order rotates) so load from other jobs hits every arm alike; each
arm's figure is its best run. Held-out loss is computed the same way for every adapter afterwards (the
project's rendering of the val rows, label-token-weighted, on the base quantized as the arm trained it).

Reported per arm: label tokens/s (label tokens of the epoch / training seconds), peak resident memory of the run,
held-out loss. The last line printed is one JSON object with `ratio_vs_trl_best`, `ratio_vs_trl_default` and
`ratio_vs_<peer>` for each peer that ran (on the first model; `by_model` has every model's). Goal (issue 16):
ratio_vs_trl_best >= 1.5 at a held-out loss within 1%. A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peers.py

import peers  # noqa: E402

MAX_LENGTH = 2048
# Qwen2.5-0.5B's shape (494 M parameters; vocab 151,936 keeps its large output head) and two small ones: the
# hidden-512 x 4-layer shape whose matmuls already scale with the tokens computed (an epoch of 24 rows is
# seconds), and the embedded tiny model (smoke tests).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, head_dim=64, vocab_size=151936),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64),
}
MODELS = ("smollm2", *SHAPES, "tiny")  # smollm2: the real SmolLM2-135M-Instruct (finetune.models.gguf)
TRL_ARMS = ("trl_default", "trl_best")
TRL_DEFAULT_MICRO_BATCH = 8  # SFTConfig's per_device_train_batch_size default
# Log-normal row lengths around a median of 200 tokens, like public instruction/chat sets (Alpaca, Dolly,
# OpenAssistant first turns have medians of 100-300 tokens and long right tails). sigma 0.6 gives
# p10 ~ 93 and p90 ~ 430 tokens; rows longer than the max length are redrawn (at 2,048 about 1 in 10^4).
MEDIAN_TOKENS, SIGMA = 200, 0.6
REPLY_SHARE = 0.45  # share of a row's words in the assistant reply (the label tokens)
VAL_FRACTION = 0.1
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing "
         "see him two has look more day could go come did number sound no most people my over know water "
         "than call first who may down side been now find").split()
ZIPF = [1 / (i + 1) for i in range(len(WORDS))]  # word frequencies: a distribution worth learning


def make_rows(n: int, tokens_per_word: float, max_tokens: int, seed: int = 0) -> list[dict]:
    """n user/assistant conversations whose rendered lengths follow the log-normal above (approximately:
    word counts are drawn from token targets divided by the measured tokens per word)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        tokens = math.exp(rng.gauss(math.log(MEDIAN_TOKENS), SIGMA))
        if not 24 <= tokens <= max_tokens - 16:  # redraw the far tails (template overhead is ~12 tokens)
            continue
        words = max(4, round((tokens - 12) / tokens_per_word))
        reply = max(2, round(words * REPLY_SHARE))
        text = rng.choices(WORDS, ZIPF, k=words)
        rows.append({"messages": [{"role": "user", "content": " ".join(text[reply:])},
                                  {"role": "assistant", "content": " ".join(text[:reply])}]})
    return rows


def sft_fields(pairs: list[str]) -> dict:
    """--baseline-set KEY=VALUE pairs as SFTConfig keyword arguments; values are JSON when they parse
    (true, 4, 0.1), text otherwise (group_by_length)."""
    out = {}
    for key, value in (kv.split("=", 1) for kv in pairs):
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --- preparing one model's work directory -----------------------------------------------------------------------

def project_config(work: Path, settings: dict):
    """The shipped default config (no experiment preset) pointed at the benchmark model and rows."""
    from hydra import compose, initialize_config_dir

    from finetune.config import register_configs, to_typed, validate
    from finetune.paths import CONFIG_DIR

    register_configs()
    sources = (f"[{{path:'{work / 'rows_train.jsonl'}',format:messages,split:train}},"
               f"{{path:'{work / 'rows_val.jsonl'}',format:messages,split:val}}]")
    overrides = ["~experiment", "device=cpu", f"model.name_or_path={work / 'model'}", "model.architecture=null",
                 f"data.sources={sources}", "data.val_fraction=0", f"data.max_length={settings['max_length']}",
                 *settings["project_set"]]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return validate(to_typed(compose("config", overrides=overrides)))


def write_model(work: Path, model: str) -> str:
    """The model folder under work/model; returns the chat-template family peers are told to use."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from finetune.models.tiny import load_tiny_tokenizer, tiny_model_dir

    if model == "smollm2":
        from finetune.models.gguf import smollm2_model_dir  # raises FinetuneError saying how to get it

        (work / "model").symlink_to(smollm2_model_dir(), target_is_directory=True)
        return "smollm2"  # ChatML with SmolLM's default system prompt
    if model == "tiny":
        shutil.copytree(tiny_model_dir(), work / "model")
        return "chatml"
    tok = load_tiny_tokenizer()
    torch.manual_seed(0)
    shape = {"vocab_size": (len(tok) + 63) // 64 * 64, **SHAPES[model]}
    config = Qwen2Config(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, **shape)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "model")  # bf16 like published checkpoints
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(work / "model")
    return "chatml"


def prepare(work: Path, settings: dict) -> dict:
    """Model, rows (train/val jsonl, shared by every arm) and the project's preprocessed splits under `work`."""
    import datasets
    import torch

    from finetune.data import build_datasets
    from finetune.models.load import load_tokenizer, resolve_dtype

    datasets.disable_progress_bars()  # their bars go to stdout, whose last line is the result
    template = write_model(work, settings["model"])
    for name in ("rows_train.jsonl", "rows_val.jsonl"):  # project_config needs them to exist
        (work / name).write_text("", encoding="utf-8")
    cfg = project_config(work, settings)
    tok = load_tokenizer(cfg.model)
    sample = " ".join(random.Random(1).choices(WORDS, ZIPF, k=2000))
    per_word = len(tok(sample, add_special_tokens=False)["input_ids"]) / 2000
    rows = make_rows(settings["rows"], per_word, cfg.data.max_length)
    n_val = max(2, round(len(rows) * VAL_FRACTION))
    for name, part in (("rows_train.jsonl", rows[n_val:]), ("rows_val.jsonl", rows[:n_val])):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    splits = build_datasets(cfg.data, tok, cache_dir=work / "cache")
    for name in ("train", "val"):
        getattr(splits, name).select_columns(["input_ids", "assistant_masks"]).save_to_disk(work / "data" / name)
    lengths = sorted(len(x) for x in splits.train["input_ids"])
    pct = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (10, 50, 90)}
    t = cfg.train
    tokens_per_step = t.per_device_train_batch_size * cfg.data.max_length * t.gradient_accumulation_steps
    rows_per_step = tokens_per_step / (sum(lengths) / len(lengths))  # bfd fills packed rows almost completely
    return {"train_rows": len(lengths), "val_rows": len(splits.val), "tokens": sum(lengths), "max": lengths[-1],
            "label_tokens": sum(sum(m) for m in splits.train["assistant_masks"]), **pct,
            "tokens_per_step": tokens_per_step,
            "trl_default_accumulation": max(1, round(rows_per_step / TRL_DEFAULT_MICRO_BATCH)),
            "auto_dtype": str(resolve_dtype("auto", "cpu")).replace("torch.", ""),
            "threads": torch.get_num_threads(), "max_length": cfg.data.max_length, "template": template,
            **model_flops(work / "model", cfg.data.max_length)}


def model_flops(model_dir: Path, max_length: int) -> dict:
    """LoRA training FLOPs per token, and the machine's measured matmul peak in the compute dtype `auto` picks.

    Per token: 4 x the matmul parameters (forward 2N, the input gradients 2N; frozen weights get no weight
    gradient, the LoRA matrices' own are negligible at r16) + causal attention at half of max_length, the
    packed row's average key count, counted as a standard implementation would (every key of the row; the
    project's per-document attention does less). The output head counts at every position (the project's
    label-only head does less). Peak: the best of 5 2048^3 matmuls."""
    import time

    import torch
    from transformers import AutoConfig

    from finetune.models.load import resolve_dtype

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = (c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    attention = 4 * 2 * c.num_hidden_layers * c.num_attention_heads * head_dim * (max_length / 2)
    dtype = resolve_dtype("auto", "cpu")
    a = torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return {"train_flops_per_token": 4 * n + attention, "matmul_peak_gflops": round(2 * 2048 ** 3 / best / 1e9, 1)}


# --- workers: one training run each, in its own process ---------------------------------------------------------

def trl_arm_fields(arm: str, cfg, data: dict, baseline_set: list[str]) -> dict:
    """SFTConfig keyword arguments of a trl arm: shared hyperparameters, the arm's own choices, then the
    --baseline-set overrides (last, so any of them can be overridden without a duplicate-keyword error)."""
    t = cfg.train
    fields = dict(num_train_epochs=1, max_length=cfg.data.max_length, use_cpu=True, report_to="none",
                  save_strategy="no", learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
                  warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                  optim=t.optim, seed=t.seed, data_seed=t.seed)
    if arm == "trl_default":  # trl's own defaults for everything that decides speed: bf16, checkpointing, no packing
        fields.update(per_device_train_batch_size=TRL_DEFAULT_MICRO_BATCH,
                      gradient_accumulation_steps=data["trl_default_accumulation"])
    else:
        fields.update(packing=True, padding_free=True, gradient_checkpointing=False,
                      bf16=data["auto_dtype"] == "bfloat16", per_device_train_batch_size=t.per_device_train_batch_size,
                      gradient_accumulation_steps=t.gradient_accumulation_steps)
    fields.update(sft_fields(baseline_set))
    return fields


def trl_trainer(arm: str, work: Path, settings: dict, data: dict):
    """A stock trl SFTTrainer with the peft QLoRA recipe, configured as the arm says."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cfg = project_config(work, settings)
    args = SFTConfig(output_dir=str(work / f"{arm}_out"), **trl_arm_fields(arm, cfg, data, settings["baseline_set"]))
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # the 4-bit layers compute in the Trainer's dtype
    model = AutoModelForCausalLM.from_pretrained(
        work / "model", dtype=dtype, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
    # peft's recipe turns checkpointing on unless told: follow the SFTConfig, or gradient_checkpointing=false
    # would have no effect
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    p = cfg.peft

    class CountingTrainer(SFTTrainer):  # counts the tokens computed, padding included; changes nothing else
        computed_tokens = 0

        def training_step(self, model, inputs, *a, **kw):
            self.computed_tokens += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *a, **kw)

    return CountingTrainer(model=model, args=args, train_dataset=load_from_disk(work / "data" / "train"),
                           processing_class=AutoTokenizer.from_pretrained(work / "model"),
                           peft_config=LoraConfig(r=p.r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                                                  target_modules=p.target_modules, task_type="CAUSAL_LM"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (a peer's CLI), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)  # ru_maxrss is in KB on Linux


def run_worker(arm: str, work: Path, evaluate: bool) -> dict:
    """Train one arm for one epoch; return its timing and peak memory (and held-out loss when `evaluate`)."""
    settings = json.loads((work / "settings.json").read_text())
    data = json.loads((work / "data.json").read_text())
    adapter, quant = work / f"{arm}_adapter", "nf4"
    extra = {}
    if arm in TRL_ARMS:
        trainer = trl_trainer(arm, work, settings, data)
        started = time.perf_counter()
        trainer.train()
        seconds, steps, computed = time.perf_counter() - started, trainer.state.global_step, trainer.computed_tokens
        trainer.save_model(str(adapter))
        # what the model actually did, not what the config asked (peft's k-bit prep can turn checkpointing on)
        checkpointed = any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
        extra = {"bf16": bool(trainer.args.bf16), "gradient_checkpointing": checkpointed,
                 "packing": bool(trainer.args.packing), "micro_batch": trainer.args.per_device_train_batch_size,
                 "accumulation": trainer.args.gradient_accumulation_steps}
    elif arm == "project":
        from datasets import load_from_disk

        from finetune.data import DataSplits
        from finetune.models.load import load_tokenizer
        from finetune.train.trainer import train

        cfg = project_config(work, settings)
        splits = DataSplits(load_from_disk(work / "data" / "train"), None, {})
        result = train(cfg, splits, load_tokenizer(cfg.model), work / "project_run")  # TrainResult
        # padding-free (no pad tokens), and fewer than the data's where shared-prefix packing cut prompt prefixes
        seconds, steps, computed = result.seconds, result.steps, result.tokens_computed or data["tokens"]
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.move(str(result.adapter_dir), adapter)
        shutil.rmtree(work / "project_run", ignore_errors=True)  # the next repeat must not resume from it
        quant = cfg.quant.method
    else:
        out = peers.run(arm, peer_job(work, settings, data))  # raises peers.PeerFailed with the reason
        seconds, steps, computed, quant = out["train_s"], out["steps"], None, out["quant"]
        shutil.rmtree(adapter, ignore_errors=True)
        if out.get("adapter_dir"):
            shutil.move(out["adapter_dir"], adapter)
        else:
            adapter = None
        extra = {k: out[k] for k in ("peer_val_loss", "settings") if k in out}
    result = {"arm": arm, "train_s": round(seconds, 2), "steps": steps, "computed_tokens": computed,
              "label_tokens_per_s": round(data["label_tokens"] / seconds, 1), "peak_rss_mb": peak_rss_mb(),
              "quant": quant, **extra}
    if evaluate:
        result["val_loss"] = round(val_loss(work, settings, adapter, quant), 4) if adapter else extra.get(
            "peer_val_loss")
    return result


def peer_job(work: Path, settings: dict, data: dict) -> "peers.Job":
    """What a peer is asked to train: the project config's hyperparameters on the shared rows and model."""
    cfg = project_config(work, settings)
    t, p = cfg.train, cfg.peft
    return peers.Job(model_dir=str((work / "model").resolve()), train_jsonl=str(work / "rows_train.jsonl"),
                     val_jsonl=str(work / "rows_val.jsonl"), out_dir=str(work / "peer_out"),
                     template=data["template"], max_length=cfg.data.max_length,
                     micro_batch=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps,
                     learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler_type, warmup=t.warmup_steps,
                     weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, r=p.r,
                     lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, dtype=data["auto_dtype"])


def val_loss(work: Path, settings: dict, adapter: Path, quant: str) -> float:
    """Label-token-weighted mean loss over the validation rows, one row per forward (no padding, no packing),
    with the adapter loaded onto the base quantized as it trained (`quant`), the same way for every arm."""
    import dataclasses

    import torch
    from datasets import load_from_disk
    from peft import PeftModel

    from finetune.models.load import load_base_model

    cfg = project_config(work, settings)
    qcfg = dataclasses.replace(cfg.quant, method=quant)
    model = PeftModel.from_pretrained(load_base_model(cfg.model, qcfg, "cpu"), str(adapter)).eval()
    total = count = 0.0
    with torch.no_grad():
        for row in load_from_disk(work / "data" / "val"):
            ids = torch.tensor([row["input_ids"]])
            labels = ids.masked_fill(torch.tensor([row["assistant_masks"]]) == 0, -100)
            n = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


# --- driver --------------------------------------------------------------------------------------------------

def spawn(arm: str, work: Path, evaluate: bool) -> dict:
    """One run in a fresh process: its JSON, or {"arm", "error"} when it failed (a peer that cannot run here)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--workdir", str(work)]
    started = time.perf_counter()
    proc = subprocess.run(cmd + (["--evaluate"] if evaluate else []), capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        # wall_s: the whole process (imports, loading, training, the held-out loss), what make bench waits for
        return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode == peers.FAILED_EXIT:  # the peer's reason, already one line
        return {"arm": arm, "error": proc.stderr.strip().splitlines()[-1]}
    if arm in ("project", *TRL_ARMS):
        raise SystemExit(f"train_throughput: the {arm} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"arm": arm, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def run_model(model: str, args, root: Path) -> dict:
    """Prepare one model's rows and run every arm `args.repeats` times, interleaved; its part of the report."""
    work = root / model
    work.mkdir()
    settings = {"model": model, "rows": args.rows, "max_length": args.max_length, "project_set": args.project_set,
                "baseline_set": args.baseline_set}
    (work / "settings.json").write_text(json.dumps(settings))
    data = prepare(work, settings)
    (work / "data.json").write_text(json.dumps(data))
    arms, skipped = list(args.arms), {}
    for name in args.peers:
        state = peers.status(name)
        if state["ok"]:
            arms.append(name)
        else:
            skipped[name] = state["reason"]
    runs: list[dict] = []
    failed: set[str] = set()
    for r in range(args.repeats):  # the order rotates: a, b, c / b, c, a / ...: drift in the load hits every arm
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            if arm in failed:
                continue
            runs.append(spawn(arm, work, evaluate=r == 0))
            print(f"  {model} run {len(runs)}: {json.dumps(runs[-1])}", flush=True)
            if "error" in runs[-1]:
                failed.add(arm)  # a peer that cannot run here is not retried
    return summarize(model, runs, data, skipped)


def summarize(model: str, runs: list[dict], data: dict, skipped: dict[str, str]) -> dict:
    """Best run per arm (its held-out loss from the first repeat), the ratios, and the table; arms that were
    skipped (`skipped`: arm -> why) or whose run failed are listed with the reason."""
    not_run = {**skipped, **{r["arm"]: r["error"] for r in runs if "error" in r}}
    # one line each (the error, a traceback's last line): a status file written by an older peers.py kept more
    not_run = {arm: (why.strip().splitlines() or [""])[-1] for arm, why in not_run.items()}
    best: dict[str, dict] = {}
    for r in runs:
        if "error" not in r and (r["arm"] not in best or r["train_s"] < best[r["arm"]]["train_s"]):
            best[r["arm"]] = {**r, "val_loss": next((x.get("val_loss") for x in runs if x["arm"] == r["arm"]
                                                     and x.get("val_loss") is not None), None)}
    print(f"{model}: {data['train_rows']} train / {data['val_rows']} val rows; tokens p10/p50/p90/max "
          f"{data['p10']}/{data['p50']}/{data['p90']}/{data['max']}; {data['tokens']} tokens, {data['label_tokens']} "
          f"label tokens; {data['tokens_per_step']} tokens per optimizer step; torch threads {data['threads']}; "
          f"compute dtype auto -> {data['auto_dtype']}")
    print(f"  {'arm':13s} {'label tok/s':>11s} {'train s':>8s} {'steps':>5s} {'computed/real':>13s} "
          f"{'peak MB':>8s} {'val loss':>8s} {'MFU':>6s}")
    for arm, r in best.items():
        computed = f"{r['computed_tokens'] / data['tokens']:.2f}" if r.get("computed_tokens") else "-"
        loss = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        # model FLOPs of the real tokens / seconds / measured peak: the work the data asks for, so an arm that
        # computes fewer tokens for it (shared prefixes: computed/real below 1) shows as a higher MFU
        if data.get("matmul_peak_gflops"):
            r["mfu"] = round(data["train_flops_per_token"] * data["tokens"] / r["train_s"]
                             / (data["matmul_peak_gflops"] * 1e9), 3)
        print(f"  {arm:13s} {r['label_tokens_per_s']:11.1f} {r['train_s']:8.1f} {r['steps']:5d} {computed:>13s} "
              f"{r['peak_rss_mb']:8.0f} {loss:>8s} {r.get('mfu', 0):6.1%}")
    for arm, why in not_run.items():
        print(f"  {arm:13s} not run: {why}")
    project = best.get("project")
    # An arm that took another number of optimizer steps packed or dropped rows differently (axolotl's multipack
    # sampler made 1 step of the 8,664 tokens at 32 rows where every other arm made 2); its tokens/s still counts
    # every label token of the epoch, so it is flagged rather than silently compared.
    steps_differ = {arm: r["steps"] for arm, r in best.items() if project and r["steps"] != project["steps"]}
    for arm, steps in steps_differ.items():
        print(f"  note: {arm} took {steps} optimizer step(s) where the project took {project['steps']}: its "
              "label tokens/s assumes it trained on every row")
    out = {"arms": best, "not_run": not_run, "data": data, "steps_differ": steps_differ}
    for arm, r in best.items():
        if arm != "project" and project:
            out[f"ratio_vs_{arm}"] = round(project["label_tokens_per_s"] / r["label_tokens_per_s"], 2)
            if project.get("val_loss") and r.get("val_loss"):
                out[f"val_loss_rel_diff_vs_{arm}"] = round(abs(project["val_loss"] - r["val_loss"]) / r["val_loss"], 4)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="make bench: --models smollm2, 96 rows, 1 repeat")
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)} "
                                                  "(default smollm2,qwen2.5-0.5b; quick smollm2)")
    p.add_argument("--rows", type=int, default=None, help="generated conversations (default 320; quick 96)")
    p.add_argument("--repeats", type=int, default=None, help="runs per arm (default 2; quick 1)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help=f"data.max_length of every arm ({MAX_LENGTH})")
    p.add_argument("--arms", default="trl_default,trl_best,project",
                   help="comma-separated, from trl_default, trl_best, project (project is always run)")
    p.add_argument("--peers", default="all", help=f"comma-separated, from {', '.join(peers.PEERS)}; all (those "
                                                  "`make peers` installed, the others reported) or none")
    p.add_argument("--project-set", action="append", default=[], metavar="KEY=VALUE",
                   help="Hydra override for the project arm (repeatable), e.g. train.packing=false")
    p.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                   help="SFTConfig field for both trl arms (repeatable; wins over the arm's own settings), e.g. "
                        "per_device_train_batch_size=2 or gradient_checkpointing=true")
    p.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.rows = a.rows if a.rows is not None else (96 if a.quick else 320)
    a.repeats = a.repeats if a.repeats is not None else (1 if a.quick else 2)
    a.models = [m.strip() for m in (a.models or ("smollm2" if a.quick else "smollm2,qwen2.5-0.5b")).split(",")]
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    a.arms = [x for x in (*TRL_ARMS, "project") if x in a.arms or x == "project"]  # fixed order, project always
    a.peers = list(peers.PEERS) if a.peers == "all" else [] if a.peers == "none" else a.peers.split(",")
    problems = []
    if a.rows < 10 or a.repeats < 1:
        problems.append(f"--rows must be >= 10 (10% go to validation) and --repeats >= 1; got {a.rows} and {a.repeats}")
    if any(m not in MODELS for m in a.models):
        problems.append(f"--models {','.join(a.models)}: choose from {', '.join(MODELS)}")
    if any(x not in peers.PEERS for x in a.peers):
        problems.append(f"--peers {','.join(a.peers)}: choose from {', '.join(peers.PEERS)}, all or none")
    bad = [kv for kv in a.project_set + a.baseline_set if "=" not in kv]
    if bad:
        problems.append(f"--project-set/--baseline-set take KEY=VALUE; got {bad}")
    if problems and not a.worker:
        p.error("; ".join(problems))
    return a


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        try:
            print(json.dumps(run_worker(args.worker, Path(args.workdir), args.evaluate)))
        except peers.PeerFailed as e:
            print(str(e), file=sys.stderr)
            raise SystemExit(peers.FAILED_EXIT) from None
        return None
    from finetune.train.threads import sample_load

    busy = sample_load(0.5)
    if busy.busy:  # run_all.py refuses; run alone, say it loudly and go on
        print(f"{'!' * 100}\nWARNING: {busy.message()}\n{'!' * 100}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    by_model, skipped = {}, {}
    try:
        for model in args.models:
            try:
                by_model[model] = run_model(model, args, root)
            except Exception as e:  # noqa: BLE001 - only the model's own preparation (the real model's files)
                if model != "smollm2" or type(e).__name__ != "FinetuneError":
                    raise
                skipped[model] = f"SmolLM2-135M-Instruct is not available here: {e}"
                print(f"{model}: SKIPPED: {skipped[model]}", flush=True)
        if not by_model:
            raise SystemExit(f"train_throughput: no model could be prepared: {skipped}")
        return report(by_model, skipped, args)
    finally:
        if args.keep:
            print(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def report(by_model: dict, skipped: dict, args) -> dict:
    """The last line: the first model's headline figures and every model's details."""
    first = next(iter(by_model))
    head = by_model[first]
    arms = head["arms"]
    result = {"model": first, **{k: v for k, v in head.items() if k.startswith(("ratio_vs_", "val_loss_rel_diff_vs_"))}}
    for arm, r in arms.items():
        result[f"{arm}_label_tokens_per_s"] = r["label_tokens_per_s"]
        result[f"{arm}_val_loss"] = r.get("val_loss")
        result[f"{arm}_peak_rss_mb"] = r["peak_rss_mb"]
        result[f"{arm}_mfu"] = r.get("mfu")
    result["matmul_peak_gflops"] = head["data"].get("matmul_peak_gflops")
    result.update(not_run=head["not_run"], models_skipped=skipped, repeats=args.repeats, rows=args.rows,
                  max_length=args.max_length, project_set=args.project_set, baseline_set=args.baseline_set,
                  by_model={m: {k: v for k, v in out.items() if k != "data"} | {"data": out["data"]}
                            for m, out in by_model.items()})
    ratio, diff = result.get("ratio_vs_trl_best"), result.get("val_loss_rel_diff_vs_trl_best")
    result["goals_met"] = {"ratio_vs_trl_best>=1.5": ratio is not None and ratio >= 1.5,
                           "val_loss_within_1%_of_trl_best": diff is not None and diff <= 0.01}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
