"""finetune generate run=<run dir> [generate.prompts=prompts.jsonl] [generate.use_adapter=true]
finetune generate generate.model=<merged folder> generate.prompts=prompts.jsonl
finetune generate run=<run dir> generate.interactive=true

Prompts: a jsonl file of {"messages": [...]} or {"prompt": "..."} rows (optional "schema" for
generate.constrain=json_schema), or the run's validation split. Writes one JSON line per prompt to
generate.output (default <run>/generations.jsonl) and prints its path.
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import setup, user_errors
from finetune.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="run_task")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg, from_run=bool(cfg.get("run")))

        from pathlib import Path

        from finetune.generate.generation import generate_run

        out = generate_run(typed, Path(typed.run) if typed.run else None)
        if out is not None:
            print(out)


if __name__ == "__main__":
    main()
