"""Data group: where the rows come from and how they become training sequences."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

FORMATS = ("alpaca", "sharegpt", "messages", "completion", "structured")
KEY_ORDERS = ("schema", "sorted", "given")
TABLE_FORMATS = ("markdown", "csv")
SCHEMA_FORMATS = ("json", "sketch")


@dataclass
class SourceConfig:
    path: str = field(default="???", metadata={"help": "jsonl/json/csv/parquet file, 'demo:<name>', or Hub id."})
    format: str = field(default="messages", metadata={"help": "alpaca | sharegpt | messages | completion | structured"})
    split: str = field(default="train", metadata={"help": "train | val: which split this source feeds."})
    weight: float = field(default=1.0, metadata={
        "help": "Train rows of this source are repeated this many times when mixing (0.5 keeps a seeded half, "
                "2 repeats each row twice). Val rows are never repeated."})
    columns: Dict[str, str] = field(default_factory=dict, metadata={
        "help": "Rename fields: {ours: theirs}, e.g. {instruction: question, output: answer}. Message keys "
                "(role, content, from, value) can be renamed too."})
    max_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N good rows of this file."})
    hub_split: str = field(default="train", metadata={"help": "Split name to load when path is a Hub dataset id."})
    schema: Any = field(default=None, metadata={
        "help": "structured: one JSON Schema for every row of this source (inline mapping or path to a .json "
                "file); a row's own schema field wins."})
    table_columns: Optional[List[str]] = field(default=None, metadata={
        "help": "structured: the target is a table with exactly these columns (rendered as data.structured."
                "table_format); rows' targets are lists of objects/lists or an already rendered table."})
    tools: Any = field(default=None, metadata={
        "help": "Tool (function) definitions for every row of this source, OpenAI style ({type: function, "
                "function: {name, description, parameters}} or bare {name, description, parameters}): a list, a "
                "JSON string or a path to a .json file. A row's own tools field wins."})


@dataclass
class StructuredConfig:
    instruction: str = field(
        default="Extract the fields from the input. Reply with only a JSON value that matches the schema.",
        metadata={"help": "Task instruction put into every structured prompt ({instruction})."})
    prompt_template: str = field(
        default="{instruction}\nSchema: {schema}\nInput: {input}",
        metadata={"help": "User message of a structured row; placeholders {instruction} {schema} {input}."})
    schema_format: str = field(default="json", metadata={
        "help": "How {schema} shows the row's schema: json (the JSON Schema, compact) | sketch (a short type "
                "signature: keys, types, enum values, `?` for optional keys; bounds left out)."})
    table_instruction: str = field(
        default="Extract a table from the input. Reply with only the table.",
        metadata={"help": "Instruction used instead for table targets; {schema} becomes the column list."})
    system: Optional[str] = field(default=None, metadata={"help": "Optional system message for structured rows."})
    key_order: str = field(default="schema", metadata={
        "help": "Key order of serialized JSON targets: schema (properties order) | sorted | given."})
    indent: Optional[int] = field(default=None, metadata={
        "help": "JSON indent of targets; null = compact one line (fewest tokens)."})
    table_format: str = field(default="markdown", metadata={"help": "markdown | csv, for table targets."})


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    val_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of train rows as val."})
    seed: int = field(default=0, metadata={"help": "Shuffling seed."})
    max_length: int = field(default=512, metadata={"help": "Longest training sequence in tokens."})
    too_long: str = field(default="drop", metadata={"help": "drop | truncate_prompt | raise"})
    train_on: str = field(default="all_assistant", metadata={"help": "all_assistant | last_assistant | everything"})
    on_error: str = field(default="skip", metadata={
        "help": "skip (default): drop bad rows, count them by reason in stats.json, log the first few with file:"
                "line; raise: stop at the first bad row."})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "With on_error=skip, fail when more than this fraction of one source's rows are bad (a wrong "
                "format or columns setting drops most rows; 1% lets a few broken rows through)."})
    train_on_reasoning: bool = field(default=True, metadata={
        "help": "Label the reasoning (reasoning_content / <think> block) of assistant replies; false masks it "
                "and trains only the answer. Needs a template that renders reasoning (Qwen3, DeepSeek-R1)."})
    num_proc: Optional[int] = field(default=None, metadata={
        "help": "Processes that render and tokenize rows; null = every core this process may use. Small "
                "datasets (under 2,000 rows) always run in-process: starting workers costs more."})
    allow_val_overlap: bool = field(default=False, metadata={
        "help": "Keep train rows whose conversation is also in the val split (default: dropped and counted as "
                "duplicate_of_val, so the model is never scored on what it trained on). true is for overfit checks."})
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    cache: bool = field(default=True, metadata={
        "help": "Reuse preprocessed data from <FINETUNE_CACHE or ~/.cache/finetune>/data when inputs match."})

    def problems(self) -> list[str]:
        out = []
        if not self.sources:
            out.append("data.sources is empty: give at least one source, e.g. data.sources='[{path:my.jsonl,format:alpaca}]'")
        for i, s in enumerate(self.sources):
            if s.format not in FORMATS:
                out.append(f"data.sources[{i}].format={s.format!r}: use one of {', '.join(FORMATS)}")
            if s.split not in ("train", "val"):
                out.append(f"data.sources[{i}].split={s.split!r}: use train or val")
            if s.weight <= 0:
                out.append(f"data.sources[{i}].weight={s.weight}: must be positive")
            if s.max_samples is not None and s.max_samples <= 0:
                out.append(f"data.sources[{i}].max_samples={s.max_samples}: must be positive (or null for all)")
            if s.tools is not None and s.format == "structured":
                out.append(f"data.sources[{i}].tools: tool definitions do not apply to format=structured")
            if (s.schema is not None or s.table_columns) and s.format != "structured":
                out.append(f"data.sources[{i}]: schema/table_columns only apply to format=structured")
            if s.table_columns is not None and not s.table_columns:
                out.append(f"data.sources[{i}].table_columns is empty: list the table's columns")
        if not 0 <= self.val_fraction < 1:
            out.append(f"data.val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.max_length <= 0:
            out.append(f"data.max_length={self.max_length}: must be positive")
        if self.too_long not in ("drop", "truncate_prompt", "raise"):
            out.append(f"data.too_long={self.too_long!r}: use drop, truncate_prompt or raise")
        if self.train_on not in ("all_assistant", "last_assistant", "everything"):
            out.append(f"data.train_on={self.train_on!r}: use all_assistant, last_assistant or everything")
        if self.on_error not in ("raise", "skip"):
            out.append(f"data.on_error={self.on_error!r}: use skip or raise")
        if not 0 <= self.max_bad_fraction <= 1:
            out.append(f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1] (0.01 = 1% of a source)")
        if self.num_proc is not None and self.num_proc < 1:
            out.append(f"data.num_proc={self.num_proc}: must be >= 1 (or null for every core)")
        st = self.structured
        if st.key_order not in KEY_ORDERS:
            out.append(f"data.structured.key_order={st.key_order!r}: use one of {', '.join(KEY_ORDERS)}")
        if st.schema_format not in SCHEMA_FORMATS:
            out.append(f"data.structured.schema_format={st.schema_format!r}: use json or sketch")
        if st.table_format not in TABLE_FORMATS:
            out.append(f"data.structured.table_format={st.table_format!r}: use markdown or csv")
        if st.indent is not None and st.indent < 0:
            out.append(f"data.structured.indent={st.indent}: use null (compact) or a number >= 0")
        if "{input}" not in st.prompt_template:
            out.append("data.structured.prompt_template has no {input} placeholder: the model would never see the input")
        return out
