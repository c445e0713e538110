"""Structured-output rows: input text + JSON target (or a table) + JSON Schema -> one conversation.

The schema and an instruction go into the user prompt (data.structured.prompt_template); the target
is serialized canonically (key order and indent configurable) so that the model learns one spelling
of each answer and eval can compare strings. Every target is validated against its schema here, at
build time: a bad target found after hours of training is far more expensive.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from finetune.data.formats import Example, _text, check_conversation, field_of, unused_fields
from finetune.data.sources import RowError, value_problem
from finetune.errors import DataError
from finetune.config.data import SourceConfig, StructuredConfig

_PLACEHOLDER = re.compile(r"\{(instruction|schema|input)\}")


def compact(value: Any) -> str:
    """One-line JSON with no spaces: the fewest tokens for the same value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_SKETCH_TYPES = {"string", "integer", "number", "boolean", "null"}


def sketch(schema: Any) -> str:
    """A short type signature of a JSON Schema for the prompt (data.structured.schema_format=sketch).

    {"name":string,"email":string|null,"items":[{"product":string,"quantity":integer}],"currency":"EUR"|"USD"}
    Keys not in `required` get a `?`; enums and consts are their JSON values; `format` shows as string<date>.
    Bounds (maxLength, minimum, maxItems) are left out: the model needs the shape, and validation and
    constrained decoding keep the full schema. A part it cannot sketch (refs, conditionals, pattern
    properties) is shown as its compact JSON, so nothing is dropped silently.
    """
    if not isinstance(schema, dict):
        return compact(schema)
    if "const" in schema:
        return compact(schema["const"])
    if isinstance(schema.get("enum"), list):
        return "|".join(compact(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and set(schema) <= {key, "description", "title"}:
            return "|".join(sketch(s) for s in schema[key])
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    if not kinds and isinstance(schema.get("properties"), dict):
        kinds = ["object"]
    if not kinds or not set(kinds) <= _SKETCH_TYPES | {"object", "array"} or any(
            k in schema for k in ("$ref", "allOf", "if", "patternProperties", "not")):
        return compact(schema)
    parts = []
    for kind in kinds:
        if kind == "object":
            props = schema.get("properties")
            if not isinstance(props, dict) or not props:
                parts.append("object")
                continue
            required = set(schema.get("required") or ())
            fields = [f"{compact(k)}{'' if k in required else '?'}:{sketch(v)}" for k, v in props.items()]
            parts.append("{" + ",".join(fields) + "}")
        elif kind == "array":
            parts.append(f"[{sketch(schema['items'])}]" if "items" in schema else "array")
        elif kind == "string" and isinstance(schema.get("format"), str):
            parts.append(f"string<{schema['format']}>")
        else:
            parts.append(kind)
    return "|".join(parts)


def fill_template(template: str, **values: str) -> str:
    # One regex pass, not str.format: user templates and inputs may contain JSON braces.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def order_keys(value: Any, schema: Any) -> Any:
    """Reorder object keys as the schema's `properties` lists them (recursively); extras keep their order."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: order_keys(value[k], props.get(k)) for k in keys}
    if isinstance(value, list):
        return [order_keys(v, schema.get("items")) for v in value]
    return value


def serialize(value: Any, schema: Any, key_order: str, indent: int | None) -> str:
    """Canonical JSON text of a target."""
    if key_order == "schema":
        value = order_keys(value, schema)
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                      sort_keys=key_order == "sorted")


def load_source_schema(schema: Any, where: str) -> dict | None:
    """A source-level schema: inline mapping, JSON string, or path to a .json file."""
    if schema is None or isinstance(schema, dict):
        return schema
    if isinstance(schema, str) and schema.lstrip().startswith("{"):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}.schema is not valid JSON: {e}") from None
    path = Path(str(schema)).expanduser()
    if not path.is_file():
        raise DataError(f"{where}.schema={schema!r}: no such file; give a JSON Schema mapping or a .json file path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}.schema: {path} is not a UTF-8 JSON file: {e}") from None


class StructuredBuilder:
    """Turns structured rows of one source into Examples (task "structured", or "table")."""

    def __init__(self, src: SourceConfig, cfg: StructuredConfig, where: str = "data.sources[]"):
        self.cols = dict(src.columns or {})
        self.cfg = cfg
        self.source_schema = load_source_schema(src.schema, where)
        self.table_columns = list(src.table_columns) if src.table_columns else None
        self._validators: dict[str, Any] = {}  # compiled once per distinct schema

    def build(self, row: dict) -> Example:
        text = _text(field_of(row, "input", self.cols), "input")
        raw_target = field_of(row, "output", self.cols)
        schema = self._row_schema(row)
        if self.table_columns:
            target = self._table_target(raw_target, schema)
            schema_text = compact({"columns": self.table_columns, "format": self.cfg.table_format})
            shown = f"columns {', '.join(self.table_columns)} ({self.cfg.table_format} table)"
            instruction, task = self.cfg.table_instruction, "table"
        else:
            if schema is None:
                raise RowError("missing_field", "structured row has no 'schema' field and the source has none; add "
                                                "one per row or set data.sources[].schema")
            value = self._parse_target(raw_target, schema)
            problem = value_problem(value, "output")
            if problem:  # NaN would serialize as the non-JSON text NaN and be trained as the answer
                raise RowError("non_finite" if "NaN" in problem else "lone_surrogate", problem)
            self._validate(value, schema)
            target = serialize(value, schema, self.cfg.key_order, self.cfg.indent)
            schema_text = compact(schema)
            shown = sketch(schema) if self.cfg.schema_format == "sketch" else schema_text
            instruction, task = self.cfg.instruction, "structured"
        prompt = fill_template(self.cfg.prompt_template, instruction=instruction, schema=shown, input=text)
        msgs = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": target.strip()}]
        if self.cfg.system:
            msgs.insert(0, {"role": "system", "content": self.cfg.system.strip()})
        return Example(check_conversation(msgs), task=task, schema=schema_text,
                       ignored=unused_fields(row, ("input", "output", "schema"), self.cols))

    def _row_schema(self, row: dict) -> dict | None:
        schema = field_of(row, "schema", self.cols, required=False)
        if schema is None or schema == "":
            return self.source_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError:
                raise RowError("bad_schema", "field 'schema' is a string but not JSON") from None
        if not isinstance(schema, dict):
            raise RowError("bad_schema", f"field 'schema' must be a JSON Schema object, got {type(schema).__name__}")
        return schema

    @staticmethod
    def _parse_target(raw: Any, schema: dict) -> Any:
        # A string target is JSON text unless the schema says the answer itself is a string.
        wants_string = schema.get("type") == "string" or (
            isinstance(schema.get("type"), list) and "string" in schema["type"])
        if isinstance(raw, str) and not wants_string:
            try:
                return json.loads(raw, parse_constant=lambda c: float("nan"))
            except json.JSONDecodeError as e:
                raise RowError("bad_target", f"field 'output' is not valid JSON ({e.msg} at column {e.colno})") from None
        return raw

    def _validate(self, value: Any, schema: dict) -> None:
        import jsonschema

        key = compact(schema)
        validator = self._validators.get(key)
        if validator is None:
            cls = jsonschema.validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise RowError("bad_schema", f"the schema itself is invalid: {e.message}") from None
            validator = self._validators[key] = cls(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "output" + "".join(f"[{p!r}]" for p in error.absolute_path)
            raise RowError("schema_mismatch", f"target fails its schema at {where}: {error.message}; fix the "
                                              "row or its schema")

    def _table_target(self, raw: Any, schema: dict | None) -> str:
        cols = self.table_columns
        if isinstance(raw, str):
            rows = parse_table(raw, self.cfg.table_format)
            if not rows or rows[0] != cols:
                got = rows[0] if rows else []
                raise RowError("table_mismatch", f"table header {got} does not equal the declared columns {cols}")
            rows = rows[1:]
        elif isinstance(raw, list):
            rows = [self._table_row(r, i) for i, r in enumerate(raw)]
            if schema is not None and all(isinstance(r, dict) for r in raw):
                self._validate(raw, schema)
        else:
            raise RowError("bad_target", f"table target must be a list of rows or a rendered table, "
                                         f"got {type(raw).__name__}")
        for i, r in enumerate(rows):
            if len(r) != len(cols):
                raise RowError("table_mismatch", f"table row {i} has {len(r)} cells, the columns are {cols}")
        return render_table(cols, rows, self.cfg.table_format)

    def _table_row(self, row: Any, i: int) -> list[str]:
        cols = self.table_columns
        if isinstance(row, dict):
            if sorted(row) != sorted(cols):
                raise RowError("table_mismatch", f"table row {i} has fields {sorted(row)}, the columns are {cols}")
            return [_cell(row[c]) for c in cols]
        if isinstance(row, list):
            return [_cell(v) for v in row]
        raise RowError("bad_target", f"table row {i} must be an object or a list, got {type(row).__name__}")


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else compact(value)


def render_table(columns: list[str], rows: list[list[str]], fmt: str) -> str:
    """Canonical markdown (pipes escaped, one line per row) or CSV text of a table."""
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([columns, *rows])
        return out.getvalue().rstrip("\n")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns), *map(line, rows)])


def parse_table(text: str, fmt: str) -> list[list[str]]:
    """Header + rows of a markdown or CSV table (the separator line of markdown is skipped)."""
    if fmt == "csv":
        return [r for r in csv.reader(io.StringIO(text.strip())) if r]
    rows = []
    for ln in text.strip().splitlines():
        ln = ln.strip()
        if not ln:
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln.strip("|"))]
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows
