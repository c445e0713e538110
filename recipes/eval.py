"""finetune eval run=<run dir> [eval.gates.exact_match=0.9 ...]

Generates on the held-out rows with the merged model, writes <run>/eval/, exits non-zero when a gate is missed.
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

        from finetune.evaluation import evaluate_run

        evaluate_run(typed, Path(typed.run))


if __name__ == "__main__":
    main()
