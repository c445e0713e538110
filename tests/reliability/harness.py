"""Running a command of the corpus in-process and judging what it left: exit code, message, leftovers.

`finetune.cli.main(argv)` runs the recipe exactly as the console entry does (Hydra included), so a case costs a
compose (about 0.5 s here) instead of a new interpreter and its imports (10-20 s with torch and peft).
"""
from __future__ import annotations

import contextlib
import io
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Names that only a write which never finished leaves behind (finetune.files, train.adapter, merge, export).
LEFTOVER_MARKS = (".tmp-", ".tmp", ".merged.tmp-")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    traceback: bool

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def run_inprocess(argv: list[str]) -> Outcome:
    """Exit code and output of `finetune <argv>`; an exception escaping the CLI counts as a traceback."""
    from finetune import cli

    out, err = io.StringIO(), io.StringIO()
    tb = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - what the user would see as a raw traceback
            traceback.print_exc(file=err)
            code, tb = 1, True
    text = out.getvalue() + err.getvalue()
    # Hydra catches a task's exception itself, prints "Error executing job" + the traceback, and exits 1.
    tb = tb or "Traceback (most recent call last)" in text or "Error executing job" in text
    return Outcome(code=code, stdout=out.getvalue(), stderr=err.getvalue(), traceback=tb)


def leftovers(root: Path) -> list[Path]:
    """Temporary files/folders of unfinished writes anywhere under `root` (Hydra's own .hydra/ excluded)."""
    return sorted(p for p in Path(root).rglob("*") if any(m in p.name for m in LEFTOVER_MARKS)
                  and ".hydra" not in p.parts)


def half_written(root: Path) -> list[str]:
    """Published artifacts under `root` that are not whole: an adapter/merged folder without its weights or
    provenance, a checkpoint without its manifest, a metrics.jsonl with a repeated step."""
    bad = [str(p) for p in leftovers(root)]
    for adapter in Path(root).rglob("adapter"):
        if adapter.is_dir() and not ((adapter / "adapter_model.safetensors").is_file()
                                     and (adapter / "provenance.json").is_file()):
            bad.append(f"{adapter}: incomplete adapter")
    for merged in Path(root).rglob("merged"):
        if merged.is_dir() and not ((merged / "config.json").is_file() and (merged / "provenance.json").is_file()):
            bad.append(f"{merged}: incomplete merged folder")
    for metrics in Path(root).rglob("metrics.jsonl"):
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if '"loss"' in line]
        if len(steps) != len(set(steps)):
            bad.append(f"{metrics}: a step logged twice ({steps})")
    return bad


@dataclass
class Case:
    """One bad input or fault: the command, what it must answer, and what it may leave behind."""

    name: str
    argv: Callable[[Path, dict], list[str]]  # (tmp dir, shared artifacts) -> argv
    code: int
    words: tuple[str, ...]
    setup: Optional[Callable[[Path, dict], None]] = None
    needs_run: bool = False  # uses the trained run of the corpus fixture (copied, never changed in place)
    check: Optional[Callable[[Path, dict, Outcome], None]] = None  # extra assertion (nothing dropped, ...)
    tags: tuple[str, ...] = field(default_factory=tuple)
