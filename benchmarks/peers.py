"""Peer fine-tuning frameworks, each in its own virtual environment, for benchmarks/train_throughput.py.

    python benchmarks/peers.py install [NAME ...]    # what `make peers` runs; all peers by default
    python benchmarks/peers.py status                # one line per peer: installed or why not

Each peer goes to .venv-peers/<name>/ (git-ignored) with the local CPU build of torch held by a constraints file
(torch==2.13.0, the project's): a peer that pins another torch fails to resolve instead of pulling a multi-GB
CUDA build. The peers' other pins (transformers, peft, trl, datasets) differ from ours, hence one venv each.
`install` leaves <venv>/peer-status.json: {"ok": true, "version": ...} or {"ok": false, "reason": ...}; the
benchmark reads it and reports a peer that did not install with that reason.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("FINETUNE_PEER_VENVS", ROOT / ".venv-peers"))  # tests point it elsewhere
TORCH = "torch==2.13.0"  # the project's CPU build (constraints.txt)
FAILED_EXIT = 17  # a benchmark worker's exit status for "this peer cannot run here" (the reason on stderr)


class PeerFailed(Exception):
    """A peer did not run here; the message is the reason, one line."""


@dataclass
class Job:
    """What every peer is asked to train: the project config's hyperparameters, on the shared rows and model."""
    model_dir: str
    train_jsonl: str
    val_jsonl: str
    out_dir: str
    template: str  # chat-template family of the model: "chatml" or "smollm2" (ChatML + SmolLM's system prompt)
    max_length: int
    micro_batch: int
    accumulation: int
    learning_rate: float
    lr_scheduler: str
    warmup: float  # a fraction of all steps when < 1, else a step count (the project's train.warmup_steps)
    weight_decay: float
    max_grad_norm: float
    seed: int
    r: int
    lora_alpha: int
    lora_dropout: float
    dtype: str  # "float32" | "bfloat16": the compute dtype the project picks on this CPU


@dataclass
class Peer:
    name: str
    requirements: list[str]  # pip requirement strings, installed together after torch
    module: str  # import name, to read the installed version
    extra_constraints: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # packages uninstalled after the install (see PEERS)
    stubs: list[str] = field(default_factory=list)  # of those, modules the peer imports unconditionally


PEERS = {
    # LLaMA-Factory trains through transformers' Trainer with its own data pipeline and templates; its pins
    # (transformers<=5.6, peft<=0.18.1, trl<=0.24, datasets<=4.0) are older than ours.
    # bitsandbytes for its QLoRA. PyPI's torchvision (a CUDA build) breaks `import transformers` against the CPU
    # torch ("operator torchvision::nms does not exist") and its newest torchaudio (2.11.1) does not load with
    # torch 2.13; LLaMA-Factory needs them only for image/audio data but imports torchaudio at the top of its
    # data module, so that one is replaced by a stub that fails only when used.
    "llamafactory": Peer("llamafactory", ["llamafactory==0.9.5", "bitsandbytes==0.50.2"], "llamafactory",
                         remove=["torchvision", "torchaudio"], stubs=["torchaudio"]),
    # torchtune: its own model builders and recipes (no transformers); torchao is a runtime dependency it does
    # not declare.
    "torchtune": Peer("torchtune", ["torchtune==0.6.1", "torchao"], "torchtune"),
    # litgpt: Lightning Fabric, its own checkpoint format (converted from the HF folder first).
    # [extra] sent pip backtracking for 20+ min; its CLI imports requests (via jsonargparse) without declaring it.
    # No bitsandbytes: Lightning refuses it without CUDA (LITGPT_NF4_ERROR).
    "litgpt": Peer("litgpt", ["litgpt==0.5.13", "requests"], "litgpt"),
    # axolotl: transformers/trl underneath; 0.19.0 is the newest release this machine's index serves.
    "axolotl": Peer("axolotl", ["axolotl==0.19.0"], "axolotl"),
}


def venv_dir(name: str) -> Path:
    return VENVS / name


def python(name: str) -> Path:
    return venv_dir(name) / "bin" / "python"


def status(name: str) -> dict:
    """What `install` left for this peer: {"ok": bool, "version" | "reason": str}."""
    path = venv_dir(name) / "peer-status.json"
    if not path.is_file():
        return {"ok": False, "reason": f"not installed: run `make peers` (benchmarks/peers.py install {name})"}
    return json.loads(path.read_text())


def install(peer: Peer) -> dict:
    """Create the peer's venv (once) and pip-install torch, then the peer; record the outcome."""
    venv = venv_dir(peer.name)
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "install.log"
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join([TORCH, *peer.extra_constraints]) + "\n")
        constraints = f.name
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python(peer.name)), "-m", "pip", "install", "-q", "-c", constraints, TORCH],
             [str(python(peer.name)), "-m", "pip", "install", "-q", "-c", constraints, *peer.requirements]]
    if peer.remove:
        steps.append([str(python(peer.name)), "-m", "pip", "uninstall", "-y", "-q", *peer.remove])
    with log.open("w") as out:
        for cmd in steps:
            if cmd[1] == "-m" and cmd[2] == "venv" and python(peer.name).is_file():
                continue
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                result = {"ok": False, "reason": f"pip failed (exit {proc.returncode}): " + _last_error(log)}
                break
        else:
            write_stubs(peer)
            proc = subprocess.run([str(python(peer.name)), "-c", f"import importlib.metadata as m, torch, {peer.module}; "
                                   f"print(m.version({peer.requirements[0].split('=')[0].split('[')[0]!r}), "
                                   "torch.__version__)"], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                # the traceback's last line (the error itself); the rest would break the benchmark's table
                last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                result = {"ok": False, "reason": f"installed but does not import: {last[-300:]}"}
            else:
                version, torch_version = proc.stdout.split()
                result = {"ok": True, "version": version, "torch": torch_version}
    result["install_s"] = round(time.perf_counter() - started)
    (venv / "peer-status.json").write_text(json.dumps(result) + "\n")
    return result


def write_stubs(peer: Peer) -> None:
    """A module for each of `peer.stubs` whose attributes raise, naming why it is not installed."""
    site = next((venv_dir(peer.name) / "lib").glob("python3*/site-packages"))
    for name in peer.stubs:
        (site / name).mkdir(exist_ok=True)
        (site / name / "__init__.py").write_text(
            f'"""Stub written by benchmarks/peers.py: no {name} build on PyPI loads with the CPU torch here."""\n'
            "def __getattr__(attr):\n"
            f"    raise ImportError('{name} is a stub in this benchmark venv (text-only training)')\n")


def _last_error(log: Path) -> str:
    """The lines of a pip log that say why (ResolutionImpossible, a failed build), shortened."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    why = [ln for ln in lines if ln.startswith(("ERROR", "error:", "The conflict is caused by")) or " depends on " in ln]
    return " | ".join((why or lines)[-6:])[-600:]


# --- running a peer --------------------------------------------------------------------------------------------

def run(name: str, job: Job) -> dict:
    """Train `job` with the peer's own CLI in its venv. Returns {"train_s", "steps", "quant", "adapter_dir"
    (a PEFT adapter folder, or None), "peer_val_loss" (optional), "settings"}.

    Raises:
        PeerFailed: not installed, no runner for it, or its CLI failed (the reason, one line).
    """
    state = status(name)
    if not state["ok"]:
        raise PeerFailed(state["reason"])
    runner = RUNNERS.get(name)
    if runner is None:
        raise PeerFailed(f"installed ({state.get('version')}), but no runner is written for it yet: " + NO_RUNNER[name])
    return runner(job)


def _cli(name: str, cmd: list[str], out_dir: Path, env: dict | None = None) -> str:
    """Run a peer's console script from its venv; its output goes to out_dir/cli.log; PeerFailed on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "cli.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": "", "PATH": f"{venv_dir(name) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                **(env or {})}
    with log.open("w") as f:
        proc = subprocess.run([str(venv_dir(name) / "bin" / cmd[0]), *cmd[1:]], stdout=f, stderr=subprocess.STDOUT,
                              env=full_env, check=False)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
        raise PeerFailed(f"{cmd[0]} failed (exit {proc.returncode}): {(errors or lines or ['no output'])[-1][:400]}")
    return text


def run_llamafactory(job: Job) -> dict:
    """`llamafactory-cli train` with its QLoRA (bitsandbytes nf4) and its best CPU settings: packing with
    `neat_packing` (block-diagonal attention, its analogue of trl's padding-free bfd), gradient checkpointing off."""
    out = Path(job.out_dir) / "llamafactory"
    shutil.rmtree(out, ignore_errors=True)
    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench_train": {
        "file_name": job.train_jsonl, "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}}))
    warmup = {"warmup_ratio": job.warmup} if job.warmup < 1 else {"warmup_steps": int(job.warmup)}
    settings = {
        "model_name_or_path": job.model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": job.r, "lora_alpha": job.lora_alpha, "lora_dropout": job.lora_dropout, "lora_target": "all",
        "quantization_bit": 4, "quantization_method": "bnb", "double_quantization": True,
        "dataset": "bench_train", "dataset_dir": str(data_dir), "template": job.template, "cutoff_len": job.max_length,
        "packing": True, "neat_packing": True, "disable_gradient_checkpointing": True, "overwrite_cache": True,
        "output_dir": str(out / "run"), "overwrite_output_dir": True, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "plot_loss": False, "per_device_train_batch_size": job.micro_batch,
        "gradient_accumulation_steps": job.accumulation, "learning_rate": job.learning_rate, "num_train_epochs": 1.0,
        "lr_scheduler_type": job.lr_scheduler, **warmup, "weight_decay": job.weight_decay,
        "max_grad_norm": job.max_grad_norm, "seed": job.seed, "bf16": job.dtype == "bfloat16", "use_cpu": True,
        "dataloader_num_workers": 0,
    }
    config = out / "train.yaml"  # its .json reading is broken in 0.9.5 (json.load on a Path); JSON is valid YAML
    config.write_text(json.dumps(settings, indent=1))
    _cli("llamafactory", ["llamafactory-cli", "train", str(config)], out,
         env={"DISABLE_VERSION_CHECK": "1", "USE_MODELSCOPE_HUB": "0", "CUDA_VISIBLE_DEVICES": ""})
    results = json.loads((out / "run" / "all_results.json").read_text())
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    adapter = out / "run"
    return {"train_s": float(results["train_runtime"]), "steps": int(state["global_step"]), "quant": "nf4",
            "adapter_dir": str(adapter) if (adapter / "adapter_config.json").is_file() else None,
            "settings": {k: settings[k] for k in ("packing", "neat_packing", "disable_gradient_checkpointing", "bf16",
                                                  "quantization_bit", "template")}}


# axolotl 0.19 passes bf16 to transformers' TrainingArguments but has no key for its use_cpu, without which
# TrainingArguments refuses bf16 on a machine without a GPU ("Your setup doesn't support bf16/gpu. You need to
# assign use_cpu ..."; axolotl's own check only warns). A plugin (its documented extension point, listed under
# `plugins:`) that adds use_cpu=True to the training arguments is what a CPU user has to write for bf16.
AXOLOTL_CPU_PLUGIN = """from axolotl.integrations.base import BasePlugin


class CPUTrainingArgs(BasePlugin):
    def get_training_args(self, cfg):
        return {"use_cpu": True}
"""


def run_axolotl(job: Job) -> dict:
    """`axolotl train` with its QLoRA and its best CPU settings: sample packing (multipack), gradient
    checkpointing off, the tokenizer's own chat template, loss on the assistant turns, bf16 when the project
    computes in bf16 (through AXOLOTL_CPU_PLUGIN)."""
    out = Path(job.out_dir) / "axolotl"
    shutil.rmtree(out, ignore_errors=True)
    (out / "plugins").mkdir(parents=True)
    (out / "plugins" / "bench_axolotl_cpu.py").write_text(AXOLOTL_CPU_PLUGIN)
    warmup = {"warmup_ratio": job.warmup} if job.warmup < 1 else {"warmup_steps": int(job.warmup)}
    settings = {
        "base_model": job.model_dir, "load_in_4bit": True, "adapter": "qlora", "lora_r": job.r,
        "lora_alpha": job.lora_alpha, "lora_dropout": job.lora_dropout, "lora_target_linear": True,
        "datasets": [{"path": job.train_jsonl, "ds_type": "json", "type": "chat_template",
                      "field_messages": "messages", "roles_to_train": ["assistant"]}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(out / "prepared"), "val_set_size": 0,
        "sequence_len": job.max_length, "sample_packing": True, "pad_to_sequence_len": False,
        "micro_batch_size": job.micro_batch, "gradient_accumulation_steps": job.accumulation, "num_epochs": 1,
        "learning_rate": job.learning_rate, "lr_scheduler": job.lr_scheduler, **warmup,
        "weight_decay": job.weight_decay, "max_grad_norm": job.max_grad_norm, "optimizer": "adamw_torch",
        "bf16": job.dtype == "bfloat16", "gradient_checkpointing": False, "output_dir": str(out / "run"),
        "save_strategy": "no", "logging_steps": 1, "seed": job.seed, "sdp_attention": True,
        "plugins": ["bench_axolotl_cpu.CPUTrainingArgs"],
        # its fused LoRA kernels are on by default for QLoRA and dequantize through CUDA streams
        # (torch._C._cuda_getCurrentRawStream): off, as a CPU user has to
        "lora_qkv_kernel": False, "lora_o_kernel": False, "lora_mlp_kernel": False,
    }
    config = out / "train.yaml"  # JSON is valid YAML
    config.write_text(json.dumps(settings, indent=1))
    # one process on CPU: its default launcher (accelerate launch) only adds a process in between
    text = _cli("axolotl", ["axolotl", "train", str(config), "--launcher", "python"], out,
                env={"CUDA_VISIBLE_DEVICES": "", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",  # no telemetry
                     "PYTHONPATH": str(out / "plugins")})
    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", text)
    per_s = re.findall(r"'train_steps_per_second': '?([0-9.]+)", text)  # its log has no step count
    adapter = out / "run"
    if not runtime:
        raise PeerFailed("axolotl train finished without a train_runtime in its log")
    steps = round(float(runtime[-1]) * float(per_s[-1])) if per_s else 0
    return {"train_s": float(runtime[-1]), "steps": steps, "quant": "nf4",
            "adapter_dir": str(adapter) if (adapter / "adapter_config.json").is_file() else None,
            "settings": {**{k: settings[k] for k in ("sample_packing", "gradient_checkpointing", "bf16", "adapter")},
                         "use_cpu": "TrainingArguments(use_cpu=True) through a plugin (AXOLOTL_CPU_PLUGIN)"}}


# litgpt's model classes take a config of its own; these HF model types map onto the named config of one model
# of that family, changed where the HF config differs (the benchmark's random shapes, the tiny model).
LITGPT_BASES = {"llama": "SmolLM2-135M-Instruct", "qwen2": "Qwen2.5-0.5B-Instruct"}
# Job.template -> litgpt prompt style, both ChatML: smollm2 with SmolLM's default system prompt, as its template;
# litgpt's plain ChatML (no system turn without a system message) is registered only as qwen3's style
LITGPT_PROMPT_STYLES = {"smollm2": "smollm2", "chatml": "qwen3"}
# `--quantize bnb.nf4`, tried with litgpt 0.5.13 + lightning 2.6.6 + bitsandbytes 0.50.2 on this CPU: Fabric's
# connector refuses its BitsandbytesPrecision on any accelerator but CUDA (fabric/connector.py).
LITGPT_NF4_ERROR = "RuntimeError: Bitsandbytes is only supported on CUDA GPUs."

# Runs in litgpt's venv: argv = HF-derived fields (JSON), checkpoint dir, data dir, prompt style. Registers a
# config when the model differs from its named base, converts with litgpt's convert_hf_checkpoint, and prints the
# token lengths litgpt's own tokenizer + prompt style give the training rows (to size its batches).
LITGPT_PREPARE = """
import json, math, sys
from pathlib import Path
from litgpt.config import Config, name_to_config
from litgpt.data.json_data import load_split
from litgpt.prompts import PromptStyle
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
from litgpt.tokenizer import Tokenizer

want, ckpt, data, style = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
base_name = want.pop("base")
base, resolved = name_to_config[base_name], Config.from_name(base_name)
same = lambda a, b: math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) or isinstance(b, float) else a == b
diff = {k: v for k, v in want.items() if not same(getattr(resolved, k), v)}
name = base_name
if diff:
    name = base_name + "-bench"  # keeps the prefix convert_hf_checkpoint picks its weight mapping by
    if "padded_vocab_size" in diff:
        diff["vocab_size"] = min(resolved.vocab_size, diff["padded_vocab_size"])
    name_to_config[name] = {**base, **diff, "name": name}
convert_hf_checkpoint(ckpt, model_name=name)
tok, prompt_style = Tokenizer(ckpt), PromptStyle.from_name(style)
lengths = [len(tok.encode(prompt_style.apply(prompt=r["instruction"], **r)))
           + len(tok.encode(r["output"], bos=False, eos=True)) for r in load_split(data / "train.json")]
print("LITGPT_PREPARE " + json.dumps({"model_name": name, "overrides": diff, "lengths": lengths}))
"""


def litgpt_fields(hf: dict) -> dict:
    """litgpt Config fields of an HF config.json (llama or qwen2), with "base": the named litgpt config of that
    family. PeerFailed for what litgpt's conversion would get wrong here (other architectures, rope scaling)."""
    kind = hf.get("model_type")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta"), "rope_type": "default"}
    problems = []
    if kind not in LITGPT_BASES:
        problems.append(f"model_type {kind!r} (mapped: {', '.join(LITGPT_BASES)})")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}")
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        problems.append(f"rope scaling {rope.get('rope_type') or hf.get('rope_scaling')!r}")
    if hf.get("use_sliding_window") or hf.get("mlp_bias"):
        problems.append("sliding window or MLP bias")
    if problems:
        raise PeerFailed("litgpt runner cannot map this HF config to a litgpt config: " + "; ".join(problems))
    heads = hf["num_attention_heads"]
    return {"base": LITGPT_BASES[kind], "n_layer": hf["num_hidden_layers"], "n_embd": hf["hidden_size"],
            "n_head": heads, "n_query_groups": hf.get("num_key_value_heads") or heads,
            "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
            "intermediate_size": hf["intermediate_size"], "padded_vocab_size": hf["vocab_size"],
            "block_size": hf["max_position_embeddings"], "rope_base": rope["rope_theta"],
            "norm_eps": hf["rms_norm_eps"], "attn_bias": kind == "qwen2" or bool(hf.get("attention_bias")),
            "bias": False}


def litgpt_rows(jsonl: str) -> list[dict]:
    """The messages rows as litgpt's single-turn SFT records: {"instruction", "output"[, "sys_prompt"]} (its
    ChatML prompt styles take the system turn as sys_prompt). PeerFailed for multi-turn rows."""
    out = []
    for n, line in enumerate(Path(jsonl).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        turns = json.loads(line)["messages"]
        system = [m["content"] for m in turns if m["role"] == "system"]
        chat = [m for m in turns if m["role"] != "system"]
        if [m["role"] for m in chat] != ["user", "assistant"] or len(system) > 1:
            raise PeerFailed(f"litgpt's SFT data is one user turn and one reply; row {n} of {jsonl} has roles "
                             f"{[m['role'] for m in turns]}")
        out.append({"instruction": chat[0]["content"], "output": chat[1]["content"],
                    **({"sys_prompt": system[0]} if system else {})})
    return out


def litgpt_schedule(job: Job, lengths: list[int]) -> tuple[int, int, int, int]:
    """(micro-batch, optimizer steps, accumulation, warmup steps) for litgpt's unpacked rows of `lengths` tokens.

    A step takes about as many rows as hold the project's packed micro_batch x accumulation x max_length tokens,
    split evenly (the rows past the last full step are computed but never stepped on). At least 2 steps: its
    scheduler (warmup then cosine over the remaining steps) divides by zero with one, and by a warmup of 0."""
    micro = job.micro_batch
    batches = -(-len(lengths) // micro)
    if batches < 2:
        raise PeerFailed(f"litgpt needs at least 2 micro-batches of {micro} rows; there are {len(lengths)} rows")
    rows_per_step = job.micro_batch * job.accumulation * job.max_length / (sum(lengths) / len(lengths))
    steps = max(2, round(batches / max(1.0, rows_per_step / micro)))
    accumulation = batches // steps
    warmup = math.ceil(job.warmup * steps) if job.warmup < 1 else int(job.warmup)
    return micro, steps, accumulation, min(max(1, warmup), steps - 1)


def run_litgpt(job: Job) -> dict:
    """`litgpt finetune_lora` on the HF folder converted by litgpt's convert_hf_checkpoint, with its best CPU
    settings: bf16-true (or 32-true) LoRA on every linear layer but the head, micro-batch job.micro_batch with
    no padding to speak of, tokenization in the main process. It does not pack, so a step takes as many rows
    as hold the project's tokens per step. LoRA on an unquantized base: its bnb.nf4 needs CUDA (LITGPT_NF4_ERROR)."""
    out = Path(job.out_dir) / "litgpt"
    shutil.rmtree(out, ignore_errors=True)
    style = LITGPT_PROMPT_STYLES.get(job.template)
    if style is None:
        raise PeerFailed(f"no litgpt prompt style for template {job.template!r}")
    want = litgpt_fields(json.loads((Path(job.model_dir) / "config.json").read_text()))
    # its Tokenizer adds a BOS before SmolLM2's chat prompt when the folder is named SmolLM2*-Instruct, which
    # the HF template does not: a neutral name keeps the rendering equal to the other arms'
    ckpt, data = out / "checkpoint", out / "data"
    ckpt.mkdir(parents=True)
    for f in Path(job.model_dir).iterdir():
        if f.is_file():
            (ckpt / f.name).symlink_to(f.resolve())
    data.mkdir()
    for split, path in (("train", job.train_jsonl), ("val", job.val_jsonl)):
        (data / f"{split}.json").write_text(json.dumps(litgpt_rows(path)), encoding="utf-8")
    (out / "prepare.py").write_text(LITGPT_PREPARE)
    text = _cli("litgpt", ["python", str(out / "prepare.py"), json.dumps(want), str(ckpt), str(data), style],
                out / "prepare")
    found = [ln for ln in text.splitlines() if ln.startswith("LITGPT_PREPARE ")]
    if not found:
        raise PeerFailed("litgpt's checkpoint conversion printed no LITGPT_PREPARE line (see prepare/cli.log)")
    prep = json.loads(found[-1][len("LITGPT_PREPARE "):])
    lengths = prep["lengths"]
    micro, steps, accumulation, warmup = litgpt_schedule(job, lengths)
    config = {
        "checkpoint_dir": str(ckpt), "out_dir": str(out / "run"),
        "precision": "bf16-true" if job.dtype == "bfloat16" else "32-true", "quantize": None, "devices": 1,
        "lora_r": int(job.r), "lora_alpha": int(job.lora_alpha),  # its CLI takes ints (the project's alpha is 32.0)
        "lora_dropout": job.lora_dropout, "lora_query": True,
        "lora_key": True, "lora_value": True, "lora_projection": True, "lora_mlp": True, "lora_head": False,
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": str(data), "mask_prompt": True, "prompt_style": style, "seed": job.seed, "num_workers": 0}},
        "train": {"save_interval": None, "log_interval": 1, "global_batch_size": micro * accumulation,
                  "micro_batch_size": micro, "lr_warmup_steps": warmup,
                  "epochs": 1, "max_seq_length": job.max_length},
        # no evaluation during the epoch; the final one (after the timed part) gives peer_val_loss. One new
        # token for the sample generation it runs at the end of the epoch, inside its training time.
        "eval": {"interval": 10 ** 9, "max_new_tokens": 1, "initial_validation": False, "final_validation": True},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": job.learning_rate, "weight_decay": job.weight_decay}},
        "logger_name": "csv", "seed": job.seed,
    }
    (out / "finetune.yaml").write_text(json.dumps(config, indent=1))  # JSON is valid YAML
    text = _cli("litgpt", ["litgpt", "finetune_lora", "--config", str(out / "finetune.yaml")], out,
                env={"CUDA_VISIBLE_DEVICES": ""})
    train_s = re.findall(r"Training Time\s*:\s*([0-9.]+) s", text)
    logged = re.findall(r"\| iter \d+ step (\d+) \|", text)
    if not train_s:
        raise PeerFailed("litgpt finetune_lora finished without a Training Time in its log")
    val = re.findall(r"Final evaluation \| val loss: ([0-9.]+)", text)  # 3 decimals; its CSV log has them all
    for path in sorted((out / "run").glob("logs/csv/*/metrics.csv")):
        val += [r["val_loss"] for r in csv.DictReader(path.open()) if r.get("val_loss")]
    return {"train_s": float(train_s[-1]), "steps": int(logged[-1]) if logged else 0,
            "quant": f"none (bnb.nf4 needs CUDA in litgpt: {LITGPT_NF4_ERROR})", "adapter_dir": None,
            **({"peer_val_loss": float(val[-1])} if val else {}),
            "settings": {"precision": config["precision"], "model_config": prep["model_name"],
                         "config_overrides": prep["overrides"], "prompt_style": style,
                         "micro_batch": micro, "accumulation": accumulation, "rows": len(lengths),
                         "mean_row_tokens": round(sum(lengths) / len(lengths), 1), "lora": "qkv,o,mlp (not head)",
                         "lr_schedule": f"linear warmup {warmup} steps + cosine (its only one)",
                         "max_grad_norm": "none (finetune_lora has no clipping)",
                         "val_loss_note": "litgpt's final validation: mean over val micro-batches of the "
                                          "label-token mean loss, bf16/fp32 as trained (not label-token-weighted "
                                          "over rows like the other arms' val_loss)"}}


RUNNERS = {"llamafactory": run_llamafactory, "axolotl": run_axolotl, "litgpt": run_litgpt}
NO_RUNNER = {
    "torchtune": "torchtune trains its own model classes, so SmolLM2 needs a hand-written builder and its GPT-2 "
                 "style tokenizer has no torchtune class (its Qwen2 tokenizer hard-codes Qwen's special-token ids)",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("install", "status"))
    p.add_argument("names", nargs="*", help=f"from {', '.join(PEERS)} (default: all)")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}: choose from {', '.join(PEERS)}")
    for name in a.names or list(PEERS):
        result = install(PEERS[name]) if a.action == "install" else status(name)
        print(f"{name:13s} {json.dumps(result)}", flush=True)
    return 0  # a peer that does not install is a finding for the benchmark, not a build failure


if __name__ == "__main__":
    sys.exit(main())
