"""Fast generation: batched, left-padded, length-sorted, KV cache, stops at the end-of-turn token.

`generate()` is the one decoding loop of the project (eval, merge parity, `finetune generate`); it calls
transformers' `model.generate` per batch (greedy batches in pieces of COMPACT_EVERY tokens that drop the rows
which stopped). `generate_run()` is the `finetune generate` command: prompts
from a jsonl file (or the run's val split) or an interactive chat, the merged model by default, results
as jsonl, optionally constrained to each row's JSON schema.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from finetune.errors import DataError, FinetuneError
from finetune.generate.prompts import PromptRow, held_out_prompts, read_prompts

log = logging.getLogger("finetune.generate.generation")


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended at an end-of-turn / eos token (not cut by max_new_tokens)
    token_ids: list[int] = field(default_factory=list)  # the generated ids, stop token excluded
    # with generate(score=...): summed cross-entropy (nats) of the scored continuation's label tokens, and their count
    target_nll: float = 0.0
    target_tokens: int = 0


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant reply (<|im_end|> for ChatML).

    Found by rendering a one-turn conversation, so it works for any template (Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>, ...), not only ChatML.
    """
    sentinel = "Zq7Zq7"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # no template, or a template that refuses this conversation
        text = ""
    tail = text[text.find(sentinel) + len(sentinel):] if sentinel in text else ""
    special = set(tokenizer.all_special_ids)
    for tok in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if tok in special:
            return tok
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else None


def stop_token_ids(tokenizer, model=None, *, generation_config=None) -> list[int]:
    """eos ids to stop on: the generation config's eos ids, the tokenizer's eos and the end-of-turn token."""
    gen = generation_config or getattr(model, "generation_config", None)
    ids: list[int] = []
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id and i not in ids:
                ids.append(i)
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    logits_processor_factory: Optional[Callable[[list[int]], Any]] = None,
    streamer=None,
    desc: str = "generate",
    score: Optional[Sequence[Optional[tuple[list[int], list[int]]]]] = None,
) -> list[Generation]:
    """Generate a reply for each tokenized prompt; results come back in input order.

    Prompts are sorted by length so each batch pads little, and left-padded so every row's next token
    sits in the last column. `logits_processor_factory(indices)` returns the processors for the prompts
    `indices` of one batch (schema-constrained decoding uses that). `streamer` (a transformers
    TextStreamer) prints tokens as they come; it needs batch_size=1. `desc` names the progress bar (one
    step per batch; none for a single batch, nor with a streamer, whose tokens are the progress).

    `score[i] = (continuation ids, label mask)` (or None): also score that continuation of prompt i teacher-forced
    (eval's target loss) in the same prefill: each batch runs once over prompt + continuation (packed, with no
    padding, where the model computes with sdpa), the continuation's label tokens give `target_nll` /
    `target_tokens`, and the KV cache of the prompt starts the decoding.
    The demo's eval otherwise prefilled its 70 prompts twice per model (loss pass and generation). Callers
    check `can_share_prefill(model)` first.
    """
    import torch

    from finetune.distributed import progress

    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    model.eval()
    starts = range(0, len(order), batch_size)
    for start in starts if streamer is not None or len(starts) == 1 else progress(starts, desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, width - len(prompts[i]):] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stops,
                                      pad_token_id=pad_id, use_cache=True, streamer=streamer)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # explicit None: the model's generation_config may carry sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if logits_processor_factory is not None:
            kwargs["logits_processor"] = logits_processor_factory(idx)
        nll = [(0.0, 0)] * len(idx)
        cache = None
        with torch.inference_mode():
            if score is not None and any(score[i] for i in idx):
                cache, nll = _prefill_scoring(model, ids, mask, [score[i] or ([], []) for i in idx])
            # Greedy, unconstrained, unstreamed batches drop their finished rows as they go (_decode_compacting);
            # processors keep per-row state and sampling its random stream, so those batches run in one call.
            compact = logits_processor_factory is None and streamer is None and not do_sample
            replies = _decode_compacting(model, ids.to(device), mask.to(device), cache, stops, kwargs) if compact \
                else _decode(model, ids.to(device), mask.to(device), cache, kwargs)
        for row, i in enumerate(idx):
            new = replies[row]
            stopped = False
            for k, tok in enumerate(new):
                if tok in stops:
                    new, stopped = new[:k], True
                    break
            results[i] = Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), stopped, new,
                                    target_nll=nll[row][0], target_tokens=nll[row][1])
    return results  # type: ignore[return-value]


def _decode(model, ids, mask, cache, kwargs) -> list[list[int]]:
    """Each row's new tokens from one model.generate call (the stop token and any padding after it included)."""
    if cache is not None:
        kwargs = {**kwargs, _cache_kwarg(model): cache}
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return [out[row, ids.shape[1]:].tolist() for row in range(ids.shape[0])]


# New tokens per model.generate call of _decode_compacting: each row costs at most this many steps past its stop.
COMPACT_EVERY = 16


def _decode_compacting(model, ids, mask, cache, stops, kwargs) -> list[list[int]]:
    """_decode, in calls of COMPACT_EVERY new tokens that go on from the KV cache, each without the rows that
    stopped in the call before (the cache keeps only the live rows: DynamicCache.batch_select_indices).

    transformers' generate decodes every row of a batch until the last one stops, and on CPU a decode step costs
    about as much per row as it did for the whole (measured on 2 cores, SmolLM2-135M bf16: 75 ms a step at 18
    rows, 133 at 36). The demo's tuned model writes 41 tokens a reply on average, while its batches of 36 ran
    for 70 steps: nearly half of those row-steps were rows that had already stopped. Its decoding went from
    19.9 / 21.8 s to 15.6 / 16.4 s (batches of 36, interleaved runs in one process, same replies). A StaticCache
    (no concatenation per step) measured no faster here: 12.4 / 13.3 s against 10.9 / 12.2 s at one batch of 70.
    """
    import torch

    budget = kwargs["max_new_tokens"]
    stop_set = set(stops)
    replies: list[list[int]] = [[] for _ in range(ids.shape[0])]
    live = list(range(ids.shape[0]))  # rows of `ids` still decoding, in the order of the batch now running
    done = 0
    while live and done < budget:
        step = min(COMPACT_EVERY, budget - done)
        call = {**kwargs, "max_new_tokens": step, "return_dict_in_generate": True}
        if cache is not None:
            call[_cache_kwarg(model)] = cache
        out = model.generate(input_ids=ids, attention_mask=mask, **call)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        fresh = out.sequences[:, ids.shape[1]:]
        keep = []
        for j, row in enumerate(live):
            tokens = fresh[j].tolist()
            replies[row].extend(tokens)
            if len(tokens) == step and not stop_set.intersection(tokens):
                keep.append(j)
        done += step
        if not keep or done >= budget or cache is None:
            break
        sel = torch.tensor(keep, device=ids.device)
        # the cache holds every column but the last new token, which the next call feeds first
        ids = out.sequences[sel]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], fresh.shape[1]))], 1)[sel]
        if len(keep) < len(live):
            cache.batch_select_indices(sel)
        live = [live[j] for j in keep]
    return replies


def can_share_prefill(model) -> Optional[str]:
    """Why generate(score=...) cannot run on `model` (None when it can): it projects the decoder's hidden states
    with the output embeddings itself, and cuts a cache whose layers keep every position."""
    from finetune.models.load import logits_not_plain

    why = logits_not_plain(model)
    if why:
        return why
    if getattr(model, "peft_config", None):
        return "an unmerged peft adapter (eval scores merged models)"
    if model.get_output_embeddings() is None:
        return "the model has no output embeddings"
    text = model.config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(text, "use_sliding_window", False):
        return f"its attention layers are {sorted(kinds)} (a sliding-window cache cannot be cut back)"
    return None


def _cache_kwarg(model) -> str:
    """The name this transformers gives the KV-cache argument: `cache` (5.24 deprecates `past_key_values`, which
    it still takes until 5.40, with a warning per call) or `past_key_values`; for a PeftModel, its base model's."""
    import inspect

    # a PeftModel's own forward keeps the old name and passes it on, so ask the model underneath
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _prefill_scoring(model, ids, mask, conts: list[tuple[list[int], list[int]]]):
    """One forward over the left-padded prompts `ids` followed by each row's continuation.

    Returns (the KV cache of all but the last prompt column, in the left-padded layout generate() continues from
    (it feeds that column itself), [(summed NLL, label tokens)] per row). Positions follow generate()'s own rule
    for left padding (cumulative mask - 1), so the cached keys are the ones a plain prefill would have made.
    Models that compute with sdpa run the rows packed (_packed_prefill); the others padded (_padded_prefill).
    """
    from finetune.models import attention

    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise FinetuneError(f"generate(score=...): {type(model).__name__}'s cache has layers that cannot be cut back")
    with attention.packed_attention(model) as packed:
        if packed and ids.shape[1] >= 2:
            return _packed_prefill(model, ids, mask, conts)
        return _padded_prefill(model, ids, mask, conts)


def _token_nll(model, hidden, gold):
    """Cross-entropy (nats, float32) of each gold token from its hidden state, in chunks of 64 MB of fp32 logits:
    the head runs only on the scored positions."""
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()
    chunk = max(1, (64 << 20) // (4 * head.weight.shape[0]))
    out = [F.cross_entropy(head(hidden[s:s + chunk]).float(), gold[s:s + chunk], reduction="none")
           for s in range(0, gold.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, device=hidden.device)


# Tokens per packed prefill forward: whole rows, so a row longer than this runs alone.
PACKED_PREFILL_TOKENS = 4096


def _packed_prefill(model, ids, mask, conts):
    """The rows' prompt + continuation packed end to end, with per-document attention (finetune.models.attention),
    in forwards of about PACKED_PREFILL_TOKENS tokens; then each row's prompt keys and values are copied into the
    left-padded cache. Padding costs nothing here: the demo's 70 held-out rows are 11,272 tokens, which the
    padded prefill computed as 14,852 (batches of 36, prompts and continuations each padded to the longest).

    A row whose prompt begins with the same tokens as an earlier row's of its forward (chat template, system
    prompt, instruction, schema) is cut to the tokens after them and reads the earlier row's keys and values
    there, as training's shared-prefix packing does (finetune.models.attention.plan_shared_prefixes); the cut
    keeps the prompt's last token, which predicts the first continuation token. Its cache takes those leading
    columns from the earlier row. On the demo's eval (2-core AVX2 EPYC, fp32, 2026-12-03, the same merged
    model scored minutes apart) the tuned model's 70 rows took 96.0 -> 76.9 s and the base's 110.1 -> 90.3 s, with
    the same replies and metrics.
    """
    import torch
    from transformers import DynamicCache

    from finetune.models.attention import plan_shared_prefixes

    device = next(model.parameters()).device
    b, width = ids.shape
    lengths = mask.sum(1).tolist()
    seqs = [ids[r, width - lengths[r]:].tolist() + list(conts[r][0]) for r in range(b)]
    groups: list[list[int]] = [[]]
    for r in range(b):
        if groups[-1] and sum(len(seqs[i]) for i in groups[-1]) + len(seqs[r]) > PACKED_PREFILL_TOKENS:
            groups.append([])
        groups[-1].append(r)
    decoder = model.get_decoder()
    keys: list = []
    values: list = []
    sums = torch.zeros(b, dtype=torch.float32, device=device)  # float32: MPS has no float64
    counts = [0] * b
    for group in groups:
        # the cut stops before the prompt's last token (index lengths[r] - 1)
        order, shared, anchor = plan_shared_prefixes([seqs[r] for r in group], [lengths[r] for r in group])
        rows = [group[i] for i in order]
        cut = {group[i]: shared[i] for i in order}
        source = {group[i]: group[anchor[i]] for i in order}
        flat = torch.tensor([t for r in rows for t in seqs[r][cut[r]:]], dtype=torch.long, device=device)
        positions = torch.tensor([p for r in rows for p in range(cut[r], len(seqs[r]))], device=device)
        offset, start = 0, {}
        for r in rows:
            start[r] = offset - cut[r]  # flat index of the row's token t (t >= its cut) is start[r] + t
            offset += len(seqs[r]) - cut[r]
        cache = DynamicCache(config=model.config)
        hidden = decoder(input_ids=flat[None], position_ids=positions[None], use_cache=True,
                         **{_cache_kwarg(decoder): cache}).last_hidden_state[0]
        where, gold, owner = [], [], []
        for r in rows:
            p = lengths[r]
            cont, labelled = conts[r]
            for t, (tok, m) in enumerate(zip(cont, labelled)):
                if m:  # token p-1+t of the row (the last prompt token, then the continuation) predicts cont[t]
                    where.append(start[r] + p - 1 + t)
                    gold.append(tok)
                    owner.append(r)
            counts[r] = sum(1 for m in labelled if m)
        if where:
            nll = _token_nll(model, hidden[torch.tensor(where, device=device)], torch.tensor(gold, device=device))
            sums.index_add_(0, torch.tensor(owner, device=device), nll)
        for layer_idx, layer in enumerate(cache.layers):
            k, v = layer.keys[0], layer.values[0]  # (kv heads, packed length, head dim)
            if len(keys) <= layer_idx:
                keys.append(k.new_zeros((b, k.shape[0], width - 1, k.shape[2])))
                values.append(v.new_zeros((b, v.shape[0], width - 1, v.shape[2])))
            for r in rows:
                p, c, a = lengths[r], cut[r], source[r]  # prompt columns width-p .. width-2 (all but its last)
                keys[layer_idx][r, :, width - p:width - p + c] = k[:, start[a]:start[a] + c]
                values[layer_idx][r, :, width - p:width - p + c] = v[:, start[a]:start[a] + c]
                keys[layer_idx][r, :, width - p + c:width - 1] = k[:, start[r] + c:start[r] + p - 1]
                values[layer_idx][r, :, width - p + c:width - 1] = v[:, start[r] + c:start[r] + p - 1]
        del cache, hidden
    out = DynamicCache(config=model.config)
    for layer_idx, (k, v) in enumerate(zip(keys, values)):
        out.update(k, v, layer_idx)
    return out, [(float(x), int(n)) for x, n in zip(sums.tolist(), counts)]


def _padded_prefill(model, ids, mask, conts):
    """_prefill_scoring for attention implementations that cannot split a packed row: prompts left-padded,
    continuations right-padded, one forward, the cache cut back to the prompt."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b, width = ids.shape
    tail = max(len(c) for c, _ in conts)
    cont = torch.zeros((b, tail), dtype=torch.long)
    cont_mask = torch.zeros((b, tail), dtype=torch.long)
    labels = torch.full((b, tail), -100, dtype=torch.long)
    for row, (c, m) in enumerate(conts):
        cont[row, :len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[row, :len(c)] = 1
        labels[row, :len(c)] = torch.where(torch.tensor(m, dtype=torch.long) > 0, cont[row, :len(c)], -100)
    full, full_mask = torch.cat([ids, cont], 1).to(device), torch.cat([mask, cont_mask], 1).to(device)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=full, attention_mask=full_mask, position_ids=positions, use_cache=True,
                     **{_cache_kwarg(decoder): cache}).last_hidden_state
    # column width-1+t (the last prompt token, then the continuation) predicts continuation token t
    hidden, labels = hidden[:, width - 1:width - 1 + tail], labels.to(device)
    sums = torch.zeros(b, dtype=torch.float32, device=device)
    scored = labels != -100
    if scored.any():
        rows = torch.arange(b, device=device)[:, None].expand_as(labels)[scored]
        sums.index_add_(0, rows, _token_nll(model, hidden[scored], labels[scored]))
    cache.crop(-(tail + 1))  # keep prompt columns 0..width-2; generate() runs the last one and goes on
    counts = scored.sum(1).tolist()
    return cache, [(float(x), int(n)) for x, n in zip(sums.tolist(), counts)]


def load_merged(path: Path, device: str, dtype):
    """A merged model folder (plain transformers format) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FinetuneError(f"{path}: no merged model here (config.json missing); run `finetune merge run=...` first")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    return model, AutoTokenizer.from_pretrained(path)


def schema_processor_factory(tokenizer, schemas: Sequence[dict], vocab_size: int) -> Callable[[list[int]], Any]:
    """logits_processor_factory for generate(): each batch gets a processor constraining row i to schemas[i]."""
    from transformers import LogitsProcessorList

    from finetune.generate.constrained import check_available, json_schema_processor

    check_available()
    eot = end_of_turn_id(tokenizer)  # a complete value must end the turn, whatever tokenizer.eos_token says

    def factory(indices: list[int]):
        return LogitsProcessorList([json_schema_processor(tokenizer, [schemas[i] for i in indices], vocab_size,
                                                          eos_token_id=eot)])

    return factory


def schema_check(text: str, schema: dict) -> dict:
    """{"json_valid", "schema_valid"} of one output (1.0 / 0.0, like the eval metrics)."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return {"json_valid": 0.0, "schema_valid": 0.0}
    try:
        jsonschema.validate(value, schema)
        return {"json_valid": 1.0, "schema_valid": 1.0}
    except jsonschema.ValidationError:
        return {"json_valid": 1.0, "schema_valid": 0.0}


def load_generation_model(cfg, run_dir: Optional[Path], device: str):
    """(model, tokenizer): the merged folder by default; the unmerged adapter with generate.use_adapter=true."""
    from finetune.models.load import load_tokenizer, resolve_dtype

    g = cfg.generate
    if g.use_adapter:
        from finetune.models.adapter import load_adapter_model

        if not (cfg.merge.adapter or run_dir):
            raise FinetuneError("generate.use_adapter=true needs run=<run dir> or merge.adapter=<adapter dir>")
        adapter = Path(cfg.merge.adapter or Path(run_dir) / "adapter")
        model = load_adapter_model(cfg, adapter, device, quantize=True)  # the base as trained (4-bit for QLoRA)
        return model, load_tokenizer(cfg.model, str(adapter))
    if not (g.model or cfg.merge.output or run_dir):
        raise FinetuneError("nothing to generate with: add run=<run dir> or generate.model=<merged model folder>")
    path = Path(g.model or cfg.merge.output or Path(run_dir) / "merged")
    if not g.model:
        from finetune.models.provenance import checked_artifact

        checked_artifact(path, run_dir)  # <run>/merged was made from this run's adapter
    return load_merged(path, device, resolve_dtype(cfg.quant.compute_dtype if g.dtype == "auto" else g.dtype, device))


def _prompt_rows(cfg, tokenizer, run_dir: Optional[Path], rows: Optional[list[PromptRow]]) -> list[PromptRow]:
    """The prompts file's rows (already read), or the run's val split; plus generate.system / generate.schema."""
    g = cfg.generate
    if rows is None and run_dir is not None:
        rows, _ = held_out_prompts(cfg.data, tokenizer)
        if not rows:
            raise FinetuneError(f"run={run_dir} has no validation rows; pass generate.prompts=<jsonl file>")
    elif rows is None:
        raise FinetuneError("no prompts: pass generate.prompts=<jsonl file> (or run=<run dir> for its val split)")
    if g.system:
        rows = [r if r.messages[0]["role"] == "system" else
                PromptRow([{"role": "system", "content": g.system}, *r.messages], r.schema, r.extra, r.origin)
                for r in rows]
    if g.schema:
        try:
            default = json.loads(Path(g.schema).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FinetuneError(f"generate.schema={g.schema!r}: cannot read a JSON schema ({e})") from None
        rows = [r if r.schema is not None else PromptRow(r.messages, default, r.extra, r.origin) for r in rows]
    return rows


def chat(model, tokenizer, cfg, *, read: Callable[[str], str] = input, write: Callable[[str], Any] = print) -> list:
    """generate.interactive=true: chat on the terminal, replies streamed. /reset clears, /exit or Ctrl-D ends."""
    from transformers import TextStreamer

    from finetune.data import render_prompt

    g = cfg.generate
    start = [{"role": "system", "content": g.system}] if g.system else []
    history = list(start)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    write("chat with the model; /reset starts over, /exit (or Ctrl-D) quits")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [render_prompt(tokenizer, history)], batch_size=1, streamer=streamer,
                         max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
                         top_p=g.top_p, top_k=g.top_k)[0]
        history.append({"role": "assistant", "content": reply.text})
    return history


def _check_schemas(rows) -> None:
    missing = [r.origin for r in rows if r.schema is None]
    if missing:
        raise DataError(f"generate.constrain=json_schema: {len(missing)} prompt(s) have no 'schema' (first: "
                        f"{missing[0]}); give each row a schema, or a default with generate.schema=<file.json>")


def generate_run(cfg, run_dir: Optional[Path] = None) -> Optional[Path]:
    """`finetune generate`: prompts (file or val split) -> jsonl of generations; or an interactive chat.

    Returns the output file (None for a chat without generate.output).
    """
    from transformers import set_seed

    from finetune.data import render_prompt
    from finetune.models.load import resolve_device
    from finetune.files import write_text_atomic

    g = cfg.generate
    run_dir = Path(run_dir) if run_dir else None
    if g.output and (Path(g.output).is_dir() or not Path(g.output).parent.is_dir() and Path(g.output).parent.exists()):
        raise FinetuneError(f"generate.output={g.output}: is a directory (or inside a file); give a file path such as "
                            f"{Path(g.output) / 'generations.jsonl'}")  # checked before any generation work
    rows = read_prompts(Path(g.prompts)) if g.prompts and not g.interactive else None  # bad lines before a slow load
    if rows is not None and g.constrain == "json_schema" and not g.schema:
        _check_schemas(rows)  # before the model loads, not after
    model, tokenizer = load_generation_model(cfg, run_dir, resolve_device(cfg.device))
    set_seed(g.seed)  # sampling is reproducible; greedy does not depend on it
    if g.interactive:
        history = chat(model, tokenizer, cfg)
        return write_text_atomic(Path(g.output), json.dumps({"messages": history}) + "\n") if g.output else None
    rows = _prompt_rows(cfg, tokenizer, run_dir, rows)
    factory = None
    if g.constrain == "json_schema":
        _check_schemas(rows)
        factory = schema_processor_factory(tokenizer, [r.schema for r in rows], model.config.vocab_size)
    gens = generate(model, tokenizer, [render_prompt(tokenizer, r.messages) for r in rows],
                    max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, do_sample=g.do_sample,
                    temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, logits_processor_factory=factory)
    lines, invalid = [], 0
    for r, x in zip(rows, gens):
        out = {**r.extra, "messages": r.messages, "generated": x.text, "new_tokens": x.new_tokens, "stopped": x.stopped}
        if r.schema is not None:
            out.update(schema_check(x.text, r.schema))
            invalid += out["schema_valid"] < 1
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    if invalid and g.constrain == "json_schema":
        log.warning("%d of %d constrained outputs do not validate (cut by generate.max_new_tokens=%d?)",
                    invalid, len(rows), g.max_new_tokens)
    out_path = Path(g.output) if g.output else (run_dir or Path(g.model or ".").parent) / "generations.jsonl"
    write_text_atomic(out_path, "".join(lines))
    log.info("%d generations -> %s", len(rows), out_path)
    return out_path
