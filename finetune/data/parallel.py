"""Rendering and tokenizing conversations on every core, with a progress bar.

A process pool rather than `datasets.map(num_proc=...)`: our rows carry Python objects (messages with
tool calls, per-row errors to count) and the content-addressed cache (cache.py) already gives the
"second run is free" part that map's fingerprint cache would. Workers are forked, so the tokenizer and
settings are inherited, not pickled per task. Below MIN_ROWS_FOR_POOL rows the pool is skipped: forking
and collecting results cost more than the work (about 0.3 s of start-up against ~1,000 rows/s per core
on the tiny tokenizer, measured with benchmarks/preprocess.py).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

MIN_ROWS_FOR_POOL = 2000
CHUNK_ROWS = 256  # rows per task: large enough to amortize the pickling, small enough to balance load

_WORKER: dict[str, Any] = {}


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init(fn: Callable, state: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the Rust pool forked mid-use can deadlock
    _WORKER["fn"], _WORKER["state"] = fn, state


def _run_chunk(items: list) -> list:
    fn, state = _WORKER["fn"], _WORKER["state"]
    return [fn(state, item) for item in items]


def map_rows(fn: Callable[[Any, Any], Any], state: Any, items: Sequence, *, num_proc: int | None,
             desc: str = "preprocess") -> Iterator[Any]:
    """fn(state, item) for every item, in order, on `num_proc` processes (None = every core).

    `fn` must be a module-level function and its results picklable; `state` (the tokenizer and
    settings) reaches the workers by fork.
    """
    from tqdm.auto import tqdm

    procs = min(num_proc or available_cores(), max(1, len(items) // CHUNK_ROWS))
    bar = tqdm(total=len(items), desc=desc, unit="rows", disable=None, leave=False)  # disable=None: off when not a tty
    try:
        if procs <= 1 or len(items) < MIN_ROWS_FOR_POOL or "fork" not in multiprocessing.get_all_start_methods():
            for item in items:
                yield fn(state, item)
                bar.update(1)
            return
        chunks = [list(items[i:i + CHUNK_ROWS]) for i in range(0, len(items), CHUNK_ROWS)]
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init, initargs=(fn, state)) as pool:
            for results in pool.map(_run_chunk, chunks):
                yield from results
                bar.update(len(results))
    finally:
        bar.close()

