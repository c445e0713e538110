"""finetune generate run=<run dir> [generate.prompts=prompts.jsonl] [generate.use_adapter=true]

Prompts: a jsonl file of {"messages": [...]} or {"prompt": "..."} rows, or the run's validation split.
Writes one JSON line per prompt to generate.output (default <run>/generations.jsonl).
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import setup, user_errors
from finetune.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="run_task")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg, from_run=True)

        from pathlib import Path

        from finetune.generate import generate_run

        print(generate_run(typed, Path(typed.run)))


if __name__ == "__main__":
    main()
