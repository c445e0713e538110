"""Multi-process training through the engines users already run (torchrun, accelerate, DeepSpeed).

We launch nothing ourselves: each rank runs `finetune train` as the launcher started it. This module
reads what the launcher told the process (environment variables), checks the setup before any model
loads, and answers "am I the process that writes files?".
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

FLOAT_STORAGE = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Launch:
    world_size: int
    rank: int
    engine: str  # "single" | "ddp" | "fsdp" | "deepspeed"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info(env: Mapping[str, str] | None = None) -> Launch:
    """What the launcher set up: torchrun sets WORLD_SIZE/RANK; accelerate adds ACCELERATE_USE_*."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        engine = "deepspeed"
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        engine = "fsdp"
    else:
        engine = "ddp" if world > 1 else "single"
    return Launch(world_size=world, rank=int(env.get("RANK", "0")), engine=engine)


def is_main_process() -> bool:
    """Only rank 0 writes logs, plots, the adapter, the merged model and the report."""
    return launch_info().is_main


def launch_problems(*, launch: Launch, per_device_batch: int, global_batch: int | None,
                    quant_method: str, storage_dtype: str | None, deepspeed_config: str | None) -> list[str]:
    """Setups that would fail late or train wrongly, as messages naming the keys involved."""
    out: list[str] = []
    if global_batch is not None:  # it replaces gradient_accumulation_steps (derived in finetune.train.trainer)
        per_step = launch.world_size * per_device_batch
        if global_batch % per_step:
            out.append(
                f"train.global_batch_size={global_batch} is not divisible by world size {launch.world_size} x "
                f"train.per_device_train_batch_size={per_device_batch} (= {per_step}); pick a global batch that "
                f"is a multiple of {per_step}, or change the batch size or the number of processes"
            )
    if launch.engine == "fsdp" and quant_method in ("nf4", "fp4") and storage_dtype not in FLOAT_STORAGE:
        out.append(
            f"quant.method={quant_method} under FSDP needs quant.storage_dtype set to the compute dtype "
            f"(bfloat16 on GPU; now {storage_dtype!r}): FSDP shards only float tensors, and 4-bit weights are "
            "stored as uint8 by default. Use quant=nf4_fsdp"
        )
    wants_deepspeed = launch.engine == "deepspeed" or bool(deepspeed_config)
    if wants_deepspeed and importlib.util.find_spec("deepspeed") is None:
        out.append(
            "DeepSpeed was requested (accelerate config or train.deepspeed) but is not installed: "
            "`pip install 'finetune[deepspeed]'` on a CUDA machine, or launch with the DDP/FSDP configs"
        )
    return out


@contextlib.contextmanager
def main_process_first(device: str) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. preprocessing into the cache), the others after it finished."""
    if launch_info().world_size <= 1:
        yield
        return
    from accelerate import PartialState

    # cpu=True on CPU: the Trainer builds the same (singleton) state with use_cpu=True and gloo later.
    with PartialState(cpu=device == "cpu").main_process_first():
        yield


def trainable_checksum(model) -> str:
    """SHA-256 over the trainable parameters (names and bytes): equal on every rank iff the ranks agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_strings(value: str) -> list[str]:
    """`value` from every rank, in rank order (a one-element list when not distributed)."""
    from accelerate.utils import gather_object

    # accelerate's process state (the Trainer's): under a launcher all_gather_object over its group (gloo on
    # CPU), without one the list comes back as given.
    return [str(v) for v in gather_object([value])]


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it", **kwargs):
    """A tqdm progress bar (the library transformers' own bars use) for a long step: merge, export, generation.

    Drawn only by rank 0 and only on a terminal (tqdm's `disable=None`): redrawn with carriage returns into a
    log file or a CI capture it is noise, and under torchrun every rank would draw its own bar over the others.
    Disabled, it is a plain pass-through, so callers need no branch.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True,
                disable=None if is_main_process() else True, **kwargs)
