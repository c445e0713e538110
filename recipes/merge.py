"""finetune merge run=<run dir> [merge.base=original|nf4_roundtrip] [merge.overwrite=true]

Merges the run's adapter into its base and writes <run>/merged (or merge.output).
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

        from finetune.merge import merge_adapter

        print(merge_adapter(typed, Path(typed.run)))


if __name__ == "__main__":
    main()
