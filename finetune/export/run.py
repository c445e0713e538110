"""`finetune export`: a run's merged model as one GGUF file for llama.cpp / Ollama, checked by reading it back.

Order of work, so that a problem surfaces before anything is written and nothing is left half-written:

1. plan (finetune/export/gguf.py): architecture, rope, tokenizer and every tensor checked against what
   llama.cpp's graph expects; the verification reader and prompts resolved; free disk space checked.
2. write into a temporary folder beside the output: <name>-<quant>.gguf (k-quants: an f16 file first, then
   llama.cpp's quantizer through llama-cpp-python), Modelfile, export.json.
3. verify (finetune/export/verify.py): reload the file (llama.cpp or transformers' GGUF loader), compare
   tokenization, chat template and greedy output with the merged model.
4. rename the folder into place (an older export of the same name goes only after that).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError
from finetune.config import FinetuneConfig
from finetune.config.export import GGUF_QUANTS, K_QUANTS

log = logging.getLogger("finetune.export.run")


def resolve_reader(verify: str) -> str:
    """auto -> llama_cpp when llama-cpp-python imports, else transformers; llama_cpp must import if asked."""
    from finetune.export.verify import llama_cpp_available

    if verify == "auto":
        return "llama_cpp" if llama_cpp_available() else "transformers"
    if verify == "llama_cpp" and not llama_cpp_available():
        raise FinetuneError("export.verify=llama_cpp needs llama-cpp-python, which compiles llama.cpp on install "
                            "(about 10 min on 2 cores): pip install 'finetune[llamacpp]'; or use "
                            "export.verify=transformers")
    return verify


def _check_space(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.05 + (64 << 20):  # the file plus 5% and 64 MB for the Modelfile/json and the filesystem
        raise FinetuneError(f"{folder}: {free / 2**30:.2f} GiB free, the GGUF file needs about {nbytes / 2**30:.2f} "
                            "GiB; free some space or set export.output= to another disk")


def _paths(cfg: FinetuneConfig, run_dir: Optional[Path]) -> tuple[Path, Path]:
    e = cfg.export
    if e.model:
        model_dir = Path(e.model)
    elif run_dir is not None:
        model_dir = Path(run_dir) / "merged"
    else:
        raise FinetuneError("nothing to export: add run=<run dir>, or export.model=<merged model folder>")
    if not (model_dir / "config.json").is_file():
        what = f"run={run_dir} has no merged model ({model_dir})" if not e.model else f"export.model={e.model!r}: " \
               "no config.json there"
        raise FinetuneError(f"{what}; run `finetune merge run=<run dir>` first, or point export.model= at a merged folder")
    if e.output:
        output = Path(e.output)
    elif run_dir is not None:
        output = Path(run_dir) / "export" / f"gguf-{e.quant}"
    else:
        output = model_dir.parent / "export" / f"gguf-{e.quant}"
    if output.exists() and not e.overwrite:
        raise FinetuneError(f"{output} already exists; pass export.overwrite=true to replace it")
    return model_dir, output


def export_gguf(cfg: FinetuneConfig, run_dir: Optional[Path] = None) -> Path:
    """Export a merged model to <output>/<name>-<quant>.gguf with an Ollama Modelfile and export.json.

    Args:
        cfg: typed config; cfg.export says quant, output, verification; cfg.data gives the verification prompts
            (the run's val split) unless export.prompts is set.
        run_dir: the training run (merged/ inside); None with export.model and export.output/prompts.
    Returns:
        The output folder; it appears only when complete.
    Raises:
        FinetuneError before anything is written: unsupported architecture/tokenizer/tensors, output exists,
        no merged model, no space, llama-cpp-python missing for export.verify=llama_cpp. After writing (and then
        nothing is published): the reader tokenizes or templates differently from transformers.
    """
    from transformers import GenerationConfig

    from finetune.export.gguf import file_summary, plan_gguf, quantize_with_llama_cpp, write_gguf
    from finetune.export.ollama import write_modelfile
    from finetune.export.verify import llama_cpp_available, verification_conversations, verify_gguf
    from finetune.generate.generation import stop_token_ids
    from finetune.files import publish_folder, write_json_atomic
    from finetune.models.provenance import checked_artifact

    e = cfg.export
    model_dir, output = _paths(cfg, run_dir)
    provenance = checked_artifact(model_dir, run_dir)  # the merged folder belongs to this run's adapter
    k_quant = e.quant in K_QUANTS
    if k_quant and not llama_cpp_available():
        raise FinetuneError(f"export.quant={e.quant} is made by llama.cpp's quantizer: pip install "
                            "'finetune[llamacpp]' (compiles llama.cpp, 10-20 min on 2 cores), or export "
                            f"one of {', '.join(GGUF_QUANTS)}")
    plan = plan_gguf(model_dir, "f16" if k_quant else e.quant)  # k-quants start from an f16 file
    reader = resolve_reader(e.verify)
    convs, source = ([], "")
    if reader != "none" and e.verify_prompts > 0:
        convs, source = verification_conversations(e, cfg.data, plan.tokenizer, run_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_space(output.parent, plan.nbytes * (2 if k_quant else 1))
    name = e.name or cfg.name
    gguf_name = f"{name.replace(' ', '-')}-{e.quant}.gguf"
    try:
        gen_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen_config = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        started = time.perf_counter()
        if k_quant:
            f16 = tmp / f".{name}-f16.gguf"
            info = write_gguf(plan, f16, name)
            quantize_with_llama_cpp(f16, tmp / gguf_name, e.quant)
            f16.unlink()
        else:
            info = write_gguf(plan, tmp / gguf_name, name)
        info.update(file_summary(tmp / gguf_name), write_seconds=round(time.perf_counter() - started, 2))
        stops = stop_token_ids(plan.tokenizer, generation_config=gen_config)
        report = {"gguf": gguf_name, "quant": e.quant, "source": str(model_dir), "provenance": provenance, **info}
        if e.modelfile:
            report["modelfile"] = write_modelfile(tmp, gguf_name, plan.tokenizer, stops, gen_config, name)
        if convs:
            report["verification"] = {"prompt_source": source, **verify_gguf(
                tmp / gguf_name, model_dir, plan.tokenizer, convs, reader=reader,
                max_new_tokens=e.verify_max_new_tokens)}
        else:
            report["verification"] = {"skipped": "export.verify=none" if reader == "none" else "export.verify_prompts=0"}
        write_json_atomic(tmp / "export.json", report)
        publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%s, %.1f MB)", model_dir, output / gguf_name, e.quant, info["bytes"] / 1e6)
    return output
