"""Fast generation: batched, left-padded, length-sorted, KV cache, stops at the end-of-turn token."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.generate")


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended at an end-of-turn / eos token (not cut by max_new_tokens)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """eos ids to stop on: the model's generation_config eos ids plus the chat end-of-turn token."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
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
    logits_processor_factory=None,
) -> list[Generation]:
    """Generate a reply for each tokenized prompt; results come back in input order.

    Prompts are sorted by length so each batch pads little, and left-padded so every row's next
    token sits in the last column. `logits_processor_factory(indices)` may return processors for the
    rows of a batch (schema-constrained decoding uses that).
    """
    import torch

    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stops,
                      pad_token_id=pad_id, use_cache=True)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if logits_processor_factory is not None:
            kwargs["logits_processor"] = logits_processor_factory(idx)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            stopped = False
            for k, tok in enumerate(new):
                if tok in stops:
                    new, stopped = new[:k], True
                    break
            results[i] = Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), stopped)
    return results  # type: ignore[return-value]


def load_merged(path: Path, device: str, dtype):
    """A merged model folder (plain transformers format) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise FinetuneError(f"{path}: no merged model here (config.json missing); run `finetune merge run=...` first")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    return model, AutoTokenizer.from_pretrained(path)


def read_prompts(path: Path) -> list[list[dict]]:
    """Conversations from a jsonl file of {"messages": [...]} or {"prompt": "..."} rows."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"generate.prompts={str(path)!r}: file not found")
    convs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise FinetuneError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            convs.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            convs.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise FinetuneError(f"{path}:{n}: expected an object with 'messages' (list) or 'prompt' (string)")
    return convs


def generate_run(cfg, run_dir: Path) -> Path:
    """`finetune generate`: prompts file (or val split) -> generations jsonl, with the merged model by default."""
    import json

    from finetune.data import build_datasets, render_prompt
    from finetune.model import resolve_device, resolve_dtype
    from finetune.runs import write_text_atomic

    g = cfg.generate
    device = resolve_device(cfg.device)
    if g.use_adapter:
        from finetune.merge import load_adapter_model
        from transformers import AutoTokenizer

        model = load_adapter_model(cfg, run_dir / "adapter", device, quantize=True)
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    else:
        model, tokenizer = load_merged(Path(cfg.merge.output or run_dir / "merged"), device,
                                       resolve_dtype(cfg.merge.dtype, device))
    if g.prompts:
        convs = read_prompts(Path(g.prompts))
    else:
        val = build_datasets(cfg.data, tokenizer).val
        convs = [json.loads(r)[:-1] for r in val["messages"]]
    gens = generate(model, tokenizer, [render_prompt(tokenizer, c) for c in convs],
                    max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, do_sample=g.do_sample,
                    temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    out = Path(g.output or run_dir / "generations.jsonl")
    write_text_atomic(out, "".join(
        json.dumps({"messages": c, "generated": x.text, "new_tokens": x.new_tokens, "stopped": x.stopped}) + "\n"
        for c, x in zip(convs, gens)))
    return out
