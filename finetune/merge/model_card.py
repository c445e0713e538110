"""The model card (README.md) of a merged model: base, data, config, parity and eval metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_json(path: Optional[Path]) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
    except ValueError:
        return None


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def write_model_card(merged_dir: Path, run_dir: Optional[Path] = None, *, config: Optional[dict] = None) -> Path:
    """(Re)write `merged_dir/README.md`: base model, data, config, parity and eval metrics.

    Reads <run>/config.yaml (unless `config` is given), <run>/data/stats.json, merged/parity.json and
    <run>/eval/report.json when they exist. `finetune eval` calls this after writing its report, so the card
    carries the metrics of the model it describes.
    """
    from datetime import datetime

    import yaml
    from huggingface_hub import ModelCard

    from finetune.files import write_text_atomic

    run_dir = Path(run_dir) if run_dir else None
    if config is None and run_dir and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    config = dict(config or {})
    report = read_json(run_dir / "eval" / "report.json") if run_dir else None
    if report and report.get("eval_config"):  # the eval settings that produced the numbers below
        config["eval"] = report["eval_config"]
    model, quant, peft, train, data = (config.get(k) or {} for k in ("model", "quant", "peft", "train", "data"))
    parity = read_json(merged_dir / "parity.json") or {}
    stats = read_json(run_dir / "data" / "stats.json") if run_dir else None
    base = str(model.get("name_or_path", "unknown"))
    header = card_data(base, model.get("revision"))
    lines = [f"# {config.get('name', 'model')}: LoRA adapter merged into {base}", "",
             "## Base model", "",
             f"- `{base}`" + (f" (revision `{model['revision']}`)" if model.get("revision") else ""),
             "", "## Data", ""]
    lines += [f"- `{s.get('path')}` (format {s.get('format')}, split {s.get('split')})"
              for s in data.get("sources", [])]
    if stats:
        lines.append(f"- rows kept {stats.get('rows_kept')} of {stats.get('rows_read')}; "
                     f"{stats.get('label_tokens')} label tokens; max_length {stats.get('max_length')}")
    lines += ["", "## Training config", "",
              f"- quantization during training: {quant.get('method')} (compute dtype {quant.get('compute_dtype')})",
              f"- LoRA r {peft.get('r')}, alpha {peft.get('lora_alpha')}, dropout {peft.get('lora_dropout')}, "
              f"targets {peft.get('target_modules')}, DoRA {peft.get('use_dora')}, rsLoRA {peft.get('use_rslora')}",
              f"- steps {train.get('max_steps')}, learning rate {train.get('learning_rate')}, "
              f"micro-batch {train.get('per_device_train_batch_size')}, packing {train.get('packing')}", ""]
    mi = parity.get("merge", {})
    lines += ["## Merge", "", f"- merged into the `{mi.get('base')}` base weights, stored as {mi.get('dtype')}"]
    if "greedy_token_agreement" in parity:
        lines.append(f"- parity with the adapter as trained ({parity['prompts']} prompts from the "
                     f"{parity['prompt_source']}): "
                     f"greedy-token agreement {parity['greedy_token_agreement']:.4f}, max |logit diff| "
                     f"{parity['max_abs_logit_diff']:.3g}, identical greedy outputs "
                     f"{parity['identical_greedy_outputs']}/{parity['prompts']}")
    if parity.get("warning"):
        lines.append(f"- **warning:** {parity['warning']}")
    lines += ["", "## Evaluation", ""]
    if report and report.get("metrics"):
        when = datetime.fromtimestamp((run_dir / "eval" / "report.json").stat().st_mtime).isoformat(timespec="seconds")
        base = report.get("base") or {}
        st = report.get("settings", {})
        constrained = (f"**constrained** to each row's JSON schema ({st['constrain']}): validity figures show "
                       "the decoder's guarantee, not the model's own" if st.get("constrain", "none") != "none"
                       else "unconstrained")
        lines += [f"From `eval/report.json` of the run ({when}): {st.get('decoding', 'greedy')} decoding, "
                  f"{constrained}, at most {st.get('max_new_tokens')} new tokens, compute dtype "
                  f"{st.get('compute_dtype', '?')}, {int(report['metrics'].get('rows', 0))} held-out rows.", "",
                  "| metric | this model | base model |" if base else "| metric | value |",
                  "|---|---|---|" if base else "|---|---|"]
        lines += [f"| {k} | {_cell(v)} | {_cell(base.get(k))} |" if base else f"| {k} | {_cell(v)} |"
                  for k, v in report["metrics"].items()]
    else:
        lines.append("Not evaluated yet: `finetune eval run=<run dir>` scores it and updates this card.")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(path)", "tok = AutoTokenizer.from_pretrained(path)",
              "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',",
              "                              return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=256)  # stops at the end-of-turn token", "```", ""]
    if config:
        lines += ["<details><summary>Full config</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    card = ModelCard.from_template(header, template_str=_TEMPLATE, body="\n".join(lines))
    return write_text_atomic(Path(merged_dir) / "README.md", str(card))


_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def card_data(base: str, revision: Optional[str] = None):
    """The card's YAML header (huggingface_hub's ModelCardData, which the Hub reads): base model, library,
    tags, and the base's license where its own card is at hand (a local folder, or the HF cache)."""
    from huggingface_hub import ModelCardData

    hub_id = not base.startswith("embedded:") and not Path(base).exists()
    # library_name is transformers, not peft: the merged folder is a plain model, loaded without peft.
    return ModelCardData(base_model=base if hub_id else None, library_name="transformers",
                         pipeline_tag="text-generation", tags=["finetune", "lora", "merged"],
                         license=_base_license(base, revision, hub_id))


def _base_license(base: str, revision: Optional[str], hub_id: bool) -> Optional[str]:
    from huggingface_hub import ModelCard, try_to_load_from_cache

    try:
        path: Any = Path(base) / "README.md"
        if hub_id:  # only what is cached already: writing a card must never reach the network
            path = try_to_load_from_cache(base, "README.md", revision=revision)
        if not isinstance(path, (str, Path)) or not Path(path).is_file():
            return None
        return ModelCard.load(path).data.license
    except Exception:  # not a repo id, or a README without valid YAML front matter: no license known
        return None
