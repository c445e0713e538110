"""Standard benchmarks through lm-evaluation-harness (optional extra): `finetune eval eval=lm_harness eval.tasks=[...]`.

The harness evaluates the model object we already loaded (merged, or the base for the comparison),
through its `HFLM` wrapper, so dtype, device and tokenizer are the ones our own checks used. Tasks are
the harness's registry (mmlu, gsm8k, humaneval, ... as in the Qwen2.5 model card; those download
their data sets from the Hub) plus folders of task YAML given in eval.task_paths, plus two small local
tasks this project defines (DEMO_TASKS) that run offline: a task YAML pointing at a local jsonl, made
from the bundled demo data. They check the bridge, not the model.
"""
from __future__ import annotations

import difflib
import json
import logging
import random
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.paths import DEMO_DATA_DIR
from finetune.files import write_json_atomic, write_text_atomic
from finetune.config import FinetuneConfig

log = logging.getLogger("finetune.eval")

INSTALL_HINT = "pip install 'finetune[eval]'  (lm-eval==0.4.13)"
DEMO_TASKS = ("finetune_demo_json", "finetune_demo_city")

# generate_until, like GSM8K: read a sentence, answer with one JSON object; scored by exact match.
_JSON_TASK = """\
task: finetune_demo_json
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Extract the fields as one JSON object.\\nInput: {{{{input}}}}"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["<|im_end|>", "\\n\\n"]
  max_gen_toks: 64
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# multiple_choice, like MMLU: four lettered options, scored by the log-likelihood of each letter.
_CITY_TASK = """\
task: finetune_demo_city
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}\\nIn which city does {{{{name}}}} live?\\nA. {{{{options[0]}}}}\\nB. {{{{options[1]}}}}\\nC. {{{{options[2]}}}}\\nD. {{{{options[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def check_available() -> None:
    """Raise FinetuneError with the install command unless lm-eval imports."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise FinetuneError(f"eval.tasks needs lm-evaluation-harness, which could not be imported ({e}). "
                            f"Install it with: {INSTALL_HINT}; or set eval.tasks=[]") from None


def write_demo_tasks(folder: Path) -> Path:
    """Write the local demo tasks (YAML + jsonl from demo_data/structured_val.jsonl) into `folder`."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (DEMO_DATA_DIR / "structured_val.jsonl").read_text().splitlines() if line]
    gen, city = [], []
    cities = sorted({r["output"]["city"] for r in rows if "city" in r["output"]})
    rng = random.Random(0)  # fixed options order: the task must be the same data every run
    for r in rows:
        gen.append({"input": r["input"], "output": json.dumps(r["output"], separators=(", ", ": "))})
        if "city" in r["output"]:
            options = [r["output"]["city"]] + rng.sample([c for c in cities if c != r["output"]["city"]], 3)
            rng.shuffle(options)
            city.append({"input": r["input"], "name": r["output"]["name"], "options": options,
                         "answer": options.index(r["output"]["city"])})
    for name, docs, template in (("finetune_demo_json", gen, _JSON_TASK), ("finetune_demo_city", city, _CITY_TASK)):
        data = folder / f"{name}.jsonl"
        write_text_atomic(data, "".join(json.dumps(d) + "\n" for d in docs))
        write_text_atomic(folder / f"{name}.yaml", template.format(data=json.dumps(str(data.resolve()))))
    return folder


def task_manager(cfg: FinetuneConfig, tasks_dir: Path):
    """A TaskManager that knows every task in eval.tasks; unknown names raise with the closest matches."""
    from lm_eval.tasks import TaskManager

    paths = []
    if any(t in DEMO_TASKS for t in cfg.eval.tasks):
        paths.append(str(write_demo_tasks(tasks_dir)))
    for p in cfg.eval.task_paths:
        if not Path(p).is_dir():
            raise FinetuneError(f"eval.task_paths: {p!r} is not a folder; give folders of lm-eval task YAML files")
        paths.append(str(Path(p).resolve()))
    # Indexing the ~14,700 built-in tasks takes ~11 s here: skip it when local tasks are all we need.
    local = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if local is not None and not set(cfg.eval.tasks) - set(local.all_tasks):
        return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in cfg.eval.tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise FinetuneError("eval.tasks: unknown lm-eval task(s): " + "; ".join(
            f"{t!r} (did you mean {', '.join(h)}?)" if h else repr(t) for t, h in hints.items())
            + ". Local tasks: " + ", ".join(DEMO_TASKS) + "; your own YAML folders go in eval.task_paths")
    return manager


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: stderr and alias dropped; 'acc,none' -> 'acc',
    'exact_match,strict-match' -> 'exact_match[strict-match]'."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            row[name if filt == "none" else f"{name}[{filt}]"] = float(value)
        out[task] = row
    return out


def run_benchmarks(cfg: FinetuneConfig, model: Any, tokenizer: Any, out_dir: Path, tag: str = "tuned", *,
                   log_samples: bool = False) -> dict:
    """Run eval.tasks on `model` with lm-evaluation-harness; write <out_dir>/lm_harness_<tag>.json
    (with every request and response under "samples" when log_samples).

    Returns {task: {metric: value}}. Raises FinetuneError when lm-eval is missing, a task is unknown,
    or a task needs code execution that eval.allow_code_execution does not allow.
    """
    check_available()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg, Path(out_dir) / "lm_tasks")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    limit = cfg.eval.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    log.info("lm-eval (%s): %s", tag, ", ".join(cfg.eval.tasks))
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.eval.tasks), task_manager=manager, num_fewshot=cfg.eval.num_fewshot,
            limit=limit, apply_chat_template=cfg.eval.apply_chat_template, log_samples=log_samples,
            confirm_run_unsafe_code=cfg.eval.allow_code_execution, bootstrap_iters=0)
    except ValueError as e:
        if "unsafe" in str(e).lower() or "code" in str(e).lower():
            raise FinetuneError(f"eval.tasks: {e}; set eval.allow_code_execution=true to run model-written "
                                "code (do it only in a sandbox)") from None
        raise
    summary = summarize(res["results"])
    write_json_atomic(Path(out_dir) / f"lm_harness_{tag}.json", {
        "summary": summary, "results": res["results"], "n_samples": res.get("n-samples"),
        "configs": res.get("configs"), "versions": res.get("versions"), "lm_eval_version": res.get("lm_eval_version"),
        "samples": res.get("samples")})
    return summary
