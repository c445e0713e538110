"""Tool definitions and tool calls in one form, whatever the file's spelling.

    tools       [{"type": "function", "function": {"name", "description"?, "parameters"?}}]   (OpenAI)
    tool_calls  [{"type": "function", "function": {"name", "arguments": {...}}, "id"?}]

Accepted spellings: OpenAI `tools` and legacy `functions`; LLaMA-Factory's `tools` JSON string of bare
{name, description, parameters}; calls as OpenAI objects, bare {name, arguments} (ShareGPT
`function_call` values) or {name, parameters} (Llama 3.1 style). Arguments become an object because chat
templates serialize them themselves (Qwen2.5 writes `arguments | tojson`): a JSON string kept as text
would be written quoted, as a string. Every call is checked against its tool's parameter schema here,
at build time, as structured targets are: a call that does not match its tool teaches the wrong call.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from finetune.data.sources import RowError
from finetune.errors import DataError


def _json_value(value: Any, where: str, reason: str) -> Any:
    if isinstance(value, str):  # LLaMA-Factory, parquet and csv exports keep these as JSON text
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(reason, f"{where} is a string but not JSON ({e.msg} at column {e.colno})") from None
    return value


def normalize_tools(value: Any, where: str = "tools") -> list[dict] | None:
    """OpenAI-form tool list of `value` (list, JSON text, or None/"" for no tools)."""
    if value is None or value == "" or value == []:
        return None
    value = _json_value(value, where, "bad_tools")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError("bad_tools", f"{where} must be a list of tool definitions, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError("bad_tools", f"{where}[{i}] needs a function name: {{type: function, function: "
                                        f"{{name, description, parameters}}}}; got {str(tool)[:80]!r}")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise RowError("bad_tools", f"{where}[{i}].parameters must be a JSON Schema object")
            problem = _schema_problem(json.dumps(params, sort_keys=True))
            if problem:
                raise RowError("bad_tools", f"{where}[{i}].parameters is not a valid JSON Schema: {problem}")
        out.append({"type": "function", "function": dict(fn)})
    return out


def load_source_tools(value: Any, where: str) -> list[dict] | None:
    """data.sources[].tools: inline list, JSON text, or a path to a .json file (a config error, not a row's)."""
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{where}={value!r}: no such file; give a list of tool definitions or a .json file path")
        value = path.read_text(encoding="utf-8-sig")
    try:
        return normalize_tools(value, where)
    except RowError as e:
        raise DataError(str(e)) from None


def normalize_tool_calls(value: Any, where: str, tools: list[dict] | None) -> list[dict]:
    """OpenAI-form tool calls of `value`, each checked against `tools` (name known, arguments valid)."""
    value = _json_value(value, where, "bad_tool_call")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError("bad_tool_call", f"{where} must be a non-empty list of tool calls")
    if not tools:
        raise RowError("missing_tools", f"{where} calls a tool but the row has no tool definitions; add a `tools` "
                                        "field to the row, or data.sources[].tools for the whole source")
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    out = []
    for i, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError("bad_tool_call", f"{where}[{i}] needs a function name and arguments; got {str(call)[:80]!r}")
        args = fn.get("arguments", fn.get("parameters", {}))
        args = _json_value(args, f"{where}[{i}].arguments", "bad_tool_call")
        if not isinstance(args, dict):
            raise RowError("bad_tool_call", f"{where}[{i}].arguments must be a JSON object, got {type(args).__name__}")
        name = fn["name"]
        if name not in by_name:
            raise RowError("unknown_tool", f"{where}[{i}] calls {name!r}, which is not among the row's tools "
                                           f"({', '.join(sorted(by_name))})")
        problem = argument_problem(by_name[name].get("parameters"), args)
        if problem:
            raise RowError("tool_args_mismatch", f"{where}[{i}] ({name}) arguments fail the tool's parameter schema: "
                                                 f"{problem}; fix the row or the tool definition")
        item: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            item["id"] = str(call["id"])
        out.append(item)
    return out


@lru_cache(maxsize=256)
def _schema_problem(schema_text: str) -> str:
    import jsonschema

    schema = json.loads(schema_text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return ""


@lru_cache(maxsize=256)
def _validator(schema_text: str):
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def argument_problem(parameters: dict | None, args: dict) -> str:
    """Why `args` fail `parameters` (a JSON Schema), or "" when they pass (or there is no schema)."""
    if not parameters:
        return ""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(json.dumps(parameters, sort_keys=True)).iter_errors(args))
    if error is None:
        return ""
    at = "".join(f"[{p!r}]" for p in error.absolute_path)
    return f"{error.message}" + (f" at arguments{at}" if at else "")


def call_schema(tools: list[dict]) -> dict:
    """JSON Schema of one call {"name": ..., "arguments": {...}} to any of `tools` (name first, as templates write it).

    Used to constrain decoding of tool-call turns and to score predicted calls.
    """
    branches = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object"}
        branches.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                         "required": ["name", "arguments"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}
