"""Checks of the command line itself, before Hydra composes anything or creates a run directory.

Hydra answers an unknown key with "To append to your config use +train.foo=..." — wrong advice here: the schema
is closed, so `+train.foo` fails too. And Hydra creates the run directory (outputs/${name}/...) before any of our
code runs, so name=../../.. made a folder outside outputs/ even though validation refused it afterwards. Both are
checked here from the dataclasses alone (no Hydra, no YAML: milliseconds).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

# Config groups chosen by file (configs/<group>/<file>.yaml): `model=qwen2_5_3b_instruct` picks a file.
GROUPS = ("model", "quant", "peft", "data", "train", "eval", "merge", "generate", "export", "verify", "experiment",
          "accelerate")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp: Any):
    """The dataclass a field holds (Optional[X] included), or None for a free-form value (dict, list, Any)."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def unknown_key(key: str, schema) -> str | None:
    """A message when dotted `key` is not in the schema (with the closest names), else None."""
    cls, path = schema, []
    for part in key.split("."):
        if cls is None:
            return None  # inside a free-form field (model.architecture.*, data.sources[...]): not ours to check
        fields = _field_types(cls)
        name = part.split("[", 1)[0]
        if name not in fields:
            where = ".".join(path) or "the top level"
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f"did you mean {', '.join('.'.join([*path, c]) for c in close)}? " if close else ""
            return (f"unknown config key {key!r}: {where} has no {name!r}; {hint}`finetune <recipe> --cfg job` "
                    "prints every key")
        path.append(name)
        cls = _dataclass_of(fields[name]) if "[" not in part else None
    return None


def argv_problems(args: list[str], schema) -> list[str]:
    """Problems of Hydra overrides (`key=value` words) that must be caught before Hydra runs."""
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.startswith("~"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key == "hydra.run.dir":
            out.extend(run_dir_problems(value))
            continue
        if key == "run" and value not in ("", "null"):  # run tasks use it as Hydra's run directory too
            from pathlib import Path

            if Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
                out.append(f"run={value}: is a file; give a run directory made by `finetune train` "
                           "(outputs/<name>/<time>)")
                continue
        if key.startswith("hydra") or "/" in key or "@" in key or key in GROUPS:
            continue
        if key == "name" and ("/" in value or "\\" in value or value.strip(" .'\"") == ""):
            out.append(f"name={value!r}: the experiment name becomes a folder under outputs/; use letters, digits, "
                       "- _ . (no slashes, not . or ..)")
            continue
        problem = unknown_key(key, schema)
        if problem:
            out.append(problem)
    return out


def run_dir_problems(value: str) -> list[str]:
    """hydra.run.dir must be a folder this process can create and write (Hydra's own error is a traceback)."""
    import os
    from pathlib import Path

    path = Path(value).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is inside {probe}, which is a file"
        return [f"hydra.run.dir={value}: {what}; the run directory must be a folder (choose another path)"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"hydra.run.dir={value}: {probe} is not writable for you; choose a folder you can write to"]
    return []
