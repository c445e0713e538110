"""finetune export run=<run dir> [export.quant=f16|q8_0|...] [export.overwrite=true]

Writes <run>/export/gguf-<quant>/ (or export.output): <name>-<quant>.gguf (the merged model with its tokenizer
and chat template in the metadata, for llama.cpp), an Ollama Modelfile, and export.json with the
verification: the file read back by llama.cpp (when llama-cpp-python is installed) or by transformers' GGUF
loader, compared with the merged model's greedy output. Prints a one-line JSON summary.
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import setup, user_errors
from finetune.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="run_task")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg, from_run=True)

        import json
        from pathlib import Path

        from finetune.export.run import export_gguf

        out = export_gguf(typed, Path(typed.run))
        report = json.loads((out / "export.json").read_text())
        check = report["verification"]
        keys = ("reader", "identical_greedy_outputs", "prompts", "max_abs_logit_diff", "ok", "skipped", "warning")
        print(json.dumps({"export": str(out / report["gguf"]), "quant": report["quant"], "bytes": report["bytes"],
                          "modelfile": str(out / "Modelfile") if "modelfile" in report else None,
                          **{k: check[k] for k in keys if k in check}}))


if __name__ == "__main__":
    main()
