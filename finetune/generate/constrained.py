"""Schema-constrained decoding (`generate.constrain=json_schema`, `eval.constrain=json_schema`), and tool calls.

Every generated output parses as JSON and validates against its row's JSON Schema: at each step a
`LogitsProcessor` sets to -inf every token that cannot continue a valid value; once the value is complete
the only allowed token is the end-of-turn token (`<|im_end|>`), and after it only padding. It works with
`model.generate(..., logits_processor=[proc])` on left-padded batches, with the KV cache, greedy or sampled.

Engine: llguidance 1.9.1 (MIT, Rust, microsoft/llguidance). Four candidates were each installed into a fresh
venv (torch 2.13 CPU, transformers 5.24) and run (a) with the tiny model, 832 logits, 2 schemas with
string/integer/enum/array/nested-object fields, batch 16, greedy and sampled, and (b) with Qwen2.5's real
151,936-id vocabulary and random logits (the worst case: a uniform random walk through the grammar).
2 shared CPU cores, one torch thread; timings vary up to 2x between runs here.

    engine (version)          install added      valid rows, (a) greedy / sampled   mask fill, (b) per row and step
    llguidance 1.9.1          8 MB, no deps      16/16 / 16/16; (b) 16/16            0.2-1.2 ms; tokenizer setup 1.3-2.7 s
    xgrammar 0.2.9            1,015 MB (triton)  16/16 / 12-15/16 *                  0.03-0.14 ms; setup 0.5-0.7 s
    outlines 1.3.3 (core)     29 MB              0/16 / 0-3/16 **                    0.07-0.3 ms; 3.2 s index build
    lm-format-enforcer 0.11.3 1 MB               import fails on transformers 5 ***  pure Python, 3-4 ms per step, tiny vocab

    *   mlc-ai/xgrammar#800 (fixes open as of 2026-09): a string with maxLength becomes a character class that
        admits raw U+0000-U+001F and no escapes, so strict json.loads fails. triton is a hard dependency on
        Linux x86_64, even next to a CPU torch.
    **  outlines-core ignores integer minimum/maximum (greedy wrote "age":5555... until max_new_tokens) and maps
        partial UTF-8 byte tokens to U+FFFD; outlines' own processor takes one schema for the whole batch.
    *** it imports transformers.tokenization_utils (gone in 5.x); shimmed it gave 0/16 and 1/16 (free
        whitespace, raw control characters, maximum ignored). Last release 2025-08.

This module, tiny model, ms per decoding step unconstrained -> constrained (mask share): batch 1 greedy
1.03 -> 1.19 ms (0.14 ms); batch 16 2.23 -> 2.91 ms (0.5-0.6 ms); all rows valid. With Qwen2.5's vocabulary
the processor takes 0.9 ms per step at batch 1 and ~9 ms at batch 16 (about half of it unpacking the bitmask
over 151,936 logits on CPU; on a GPU that part runs on the GPU): small next to a 3B model's CPU forward.

Why llguidance: the only engine whose outputs were all valid in every run; 8 MB with no dependencies; one
grammar per row; it reads our byte-level tokenizer from tokenizer.json and never lets special tokens or the
padding ids past len(tokenizer) through. xgrammar computes masks ~5x faster but is not correct today and
costs 1 GB of install; if #800 is fixed and speed matters on a GPU box, it is the one to re-measure.

Matching the training format: object keys must come in the schema's `properties` order (llguidance enforces
it; data.structured.key_order=schema, the default, writes targets that way); separators default to compact
(",", ":") as for data.structured.indent=null; pass flexible_whitespace=True for indented targets.

Limitation (all four engines): the mask keeps every prefix valid but does not make the value finish. A model
that does not know the format (the random tiny model, an untrained base) can write a string, number, array or
whitespace forever: greedy on the tiny model wrote `"name":" plus plus plus ...` until max_new_tokens.
Bound the schema (maxLength, maxItems, integer minimum/maximum, additionalProperties: false) where termination
must be guaranteed; otherwise a row that hits max_new_tokens is cut and must be scored as invalid JSON.
Beam search (num_beams > 1) is not supported: it reorders rows between steps, which the processor detects.
"""
from __future__ import annotations

import json
import logging
import weakref
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'llguidance>=1.9.1,<2'"

# Building llguidance's tokenizer from a 151k vocabulary takes ~2.7 s here, so it is built once per
# tokenizer object (and vocab size, end token) and dropped with the tokenizer.
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_EXECUTOR = None  # llguidance's thread pool for computing a batch of masks; one per process


def check_available() -> None:
    """Raise FinetuneError with an install hint unless the constrained-decoding engine can be imported."""
    try:
        import llguidance  # noqa: F401
        import llguidance.hf  # noqa: F401
        import llguidance.numpy  # noqa: F401  (not llguidance.torch: it torch.compile()s at import, ~4 s)
    except ImportError as e:
        raise FinetuneError(
            f"constrain=json_schema needs the llguidance package, which could not be imported ({e}). "
            f"Install it with: {INSTALL_HINT}  (or set generate.constrain=none / eval.constrain=none)"
        ) from e


def json_schema_processor(
    tokenizer: Any,
    schemas: Sequence[dict | str],
    vocab_size: int,
    *,
    separators: tuple[str, str] = (",", ":"),
    flexible_whitespace: bool = False,
    eos_token_id: Optional[int] = None,
) -> "JsonSchemaLogitsProcessor":
    """Build a logits processor that keeps each row's output a JSON value valid under that row's schema.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        schemas: one JSON Schema (dict or JSON text) per batch row, in the order of the rows of `input_ids` (prompts left-padded).
            With `num_return_sequences=k` the batch has k rows per schema, as `generate` expands it.
        vocab_size: columns of the model's logits (`model.config.vocab_size`), which may exceed len(tokenizer).
        separators: item and key separators, as in `json.dumps`; match how training targets were written.
        flexible_whitespace: allow any JSON whitespace (for indented targets) instead of `separators` only.
        eos_token_id: the token that ends a complete value; default `tokenizer.eos_token_id` (`<|im_end|>`).
    Returns:
        A single-use processor: build a new one for each `generate` call.
    Raises:
        FinetuneError: llguidance is missing, a schema is not valid or not supported, or no end token.
    """
    check_available()
    import llguidance

    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise FinetuneError("constrained decoding needs an end token: the tokenizer has no eos_token; pass eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if len(tokenizer) > vocab_size:
        raise FinetuneError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens): "
                            "pass the model's logits width, model.config.vocab_size")
    lltok = _ll_tokenizer(tokenizer, vocab_size, eos)
    options = {"whitespace_flexible": flexible_whitespace}
    if not flexible_whitespace:
        options.update(item_separator=separators[0], key_separator=separators[1])

    grammars: list[str] = []
    compiled: dict[str, str] = {}  # rows often share a schema: check each distinct one once
    for row, schema in enumerate(schemas):
        try:  # the key keeps property order: it is the order the grammar enforces
            key = schema if isinstance(schema, str) else json.dumps(schema)
        except TypeError as e:
            raise FinetuneError(f"schema of row {row} is not plain JSON data: {e}") from e
        if key not in compiled:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(key, overrides=options)
            except ValueError as e:
                raise FinetuneError(f"schema of row {row} is not a JSON object: {e}") from e
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
            if is_error:
                raise FinetuneError(f"schema of row {row} cannot be enforced: {messages[0]}  (schema: {key[:200]})")
            for m in messages:
                log.warning("schema of row %d: %s", row, m)
            compiled[key] = grammar
        grammars.append(compiled[key])
    if not grammars:
        raise FinetuneError("json_schema_processor needs one schema per batch row; got none")
    return JsonSchemaLogitsProcessor(lltok, grammars, vocab_size, eos, pad)


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos: int):
    import llguidance.hf

    per_tok = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if (vocab_size, eos) not in per_tok:
        try:
            per_tok[vocab_size, eos] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        except ValueError as e:  # a slow (Python) tokenizer: llguidance reads the Rust tokenizer's JSON
            raise FinetuneError(f"constrained decoding needs a fast tokenizer (tokenizer.json): {e}") from e
    return per_tok[vocab_size, eos]


def _one_token_row(width: int, token_id: int) -> np.ndarray:
    row = np.zeros(width, dtype=np.uint32)
    row[token_id // 32] = np.uint32(1) << np.uint32(token_id % 32)
    return row.view(np.int32)


class JsonSchemaLogitsProcessor(LogitsProcessor):
    """Masks each row's logits to the tokens its JSON Schema allows next. Single use; see json_schema_processor."""

    def __init__(self, lltokenizer: Any, grammars: list[str], vocab_size: int, eos_token_id: int, pad_token_id: int):
        self._lltok = lltokenizer
        self._grammars = grammars
        self._vocab_size = vocab_size
        self._eos = eos_token_id
        self._words = (vocab_size + 31) // 32  # the mask is packed 32 tokens to an int32
        self._pad_only = _one_token_row(self._words, pad_token_id)
        self._matchers: list = []
        self._finished: list[bool] = []
        self._seen = 0  # length of input_ids at the previous call
        self._last: Optional[torch.Tensor] = None  # input_ids[:, -1] at the previous call
        self._bitmask = np.zeros((0, self._words), dtype=np.int32)
        self._shifts: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] != self._vocab_size:
            raise FinetuneError(f"the logits have {scores.shape[-1]} columns but the processor was built for "
                                f"vocab_size={self._vocab_size}: pass model.config.vocab_size")
        if not self._matchers:
            self._start(input_ids)
        else:
            self._check_continues(input_ids)
            self._consume(input_ids[:, -1].tolist())
        self._seen, self._last = input_ids.shape[1], input_ids[:, -1].clone()
        self._fill()
        return self._apply(scores)

    def _start(self, input_ids: torch.Tensor) -> None:
        import llguidance

        rows, n = input_ids.shape[0], len(self._grammars)
        if rows % n:
            raise FinetuneError(f"the batch has {rows} rows but {n} schemas were given: pass one schema per row")
        per_schema = rows // n  # num_return_sequences: generate repeats each row in place (repeat_interleave)
        self._matchers = [llguidance.LLMatcher(self._lltok, g, log_level=0)
                          for g in self._grammars for _ in range(per_schema)]
        self._finished = [False] * rows
        self._bitmask = np.zeros((rows, self._words), dtype=np.int32)

    def _check_continues(self, input_ids: torch.Tensor) -> None:
        # Each call must append exactly one token to every row of the previous call's input_ids.
        if (input_ids.shape[0] != len(self._matchers) or input_ids.shape[1] != self._seen + 1
                or not torch.equal(input_ids[:, -2], self._last)):
            raise FinetuneError(
                "the JSON-schema logits processor saw rows that do not continue its previous step: it is single-use "
                "(build a new one per generate call) and supports greedy and sampling only, not beam search (num_beams=1)")

    def _consume(self, tokens: list[int]) -> None:
        for row, (matcher, token) in enumerate(zip(self._matchers, tokens)):
            if self._finished[row]:
                continue  # generate() appends padding after a row's end token
            if not matcher.consume_token(token):
                raise FinetuneError(
                    f"row {row}: token {token} was generated although the schema forbids it ({matcher.get_error()}). "
                    "Something after this processor changed the logits: put it last in logits_processor and drop "
                    "min_new_tokens / suppress_tokens / bad_words_ids / forced tokens for constrained generation.")
            self._finished[row] = token == self._eos

    def _fill(self) -> None:
        import llguidance
        import llguidance.numpy

        global _EXECUTOR
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        active = [(m, row) for row, m in enumerate(self._matchers) if not self._finished[row]]
        if active:  # a complete value allows only the end token: llguidance's mask already says so
            llguidance.numpy.fill_next_token_bitmask_par(_EXECUTOR, active, self._bitmask)
        for row, done in enumerate(self._finished):
            if done:
                self._bitmask[row] = self._pad_only

    def _apply(self, scores: torch.Tensor) -> torch.Tensor:
        # Unpack on the logits' device (a GPU when there is one): bit j of word w is token 32*w + j.
        packed = torch.from_numpy(self._bitmask).to(scores.device)
        if self._shifts is None or self._shifts.device != scores.device:
            self._shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
        allowed = ((packed.unsqueeze(-1) >> self._shifts) & 1).view(packed.shape[0], -1)[:, : self._vocab_size]
        # Not in place: generate() keeps the unprocessed logits when output_logits=True.
        return scores.masked_fill(allowed == 0, float("-inf"))


def tool_call_grammar(call_schema: dict, prefix: str, suffix: str, separators: tuple[str, str] = (", ", ": ")) -> str:
    """llguidance Lark grammar of one tool call in the template's wire format: prefix + JSON call + suffix.

    `call_schema` is finetune.data.tools.call_schema(tools): {"name": const, "arguments": <the tool's
    parameter schema>}, so the arguments are held to the tool's schema, not only to "some JSON". The
    separators are the template's (Qwen2.5 writes its calls with `tojson`: ", " and ": ").
    """
    schema = dict(call_schema)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": separators[0],
                            "key_separator": separators[1]}
    return (f"start: {json.dumps(prefix)} call {json.dumps(suffix)}\n"
            f"call: %json {json.dumps(schema)}\n")


def tool_call_processor(
    tokenizer: Any,
    call_schemas: Sequence[dict],
    vocab_size: int,
    *,
    prefix: str,
    suffix: str,
    separators: tuple[str, str] = (", ", ": "),
    eos_token_id: Optional[int] = None,
) -> "JsonSchemaLogitsProcessor":
    """Like json_schema_processor, for tool-call turns: row i writes one call valid under call_schemas[i].

    prefix / suffix / separators come from finetune.data.render.tool_call_format(tokenizer) (for Qwen2.5:
    "<tool_call>\\n", "\\n</tool_call>"). Raises FinetuneError as json_schema_processor does.
    """
    check_available()
    import llguidance

    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise FinetuneError("constrained decoding needs an end token: the tokenizer has no eos_token; pass eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    lltok = _ll_tokenizer(tokenizer, vocab_size, eos)
    grammars, compiled = [], {}
    for row, schema in enumerate(call_schemas):
        text = tool_call_grammar(schema, prefix, suffix, separators)
        if text not in compiled:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
            if is_error:
                raise FinetuneError(f"tool-call schema of row {row} cannot be enforced: {messages[0]}")
            compiled[text] = grammar
        grammars.append(compiled[text])
    if not grammars:
        raise FinetuneError("tool_call_processor needs one call schema per batch row; got none")
    return JsonSchemaLogitsProcessor(lltok, grammars, vocab_size, eos, pad)
