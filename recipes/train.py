"""finetune train [overrides] — train a LoRA/QLoRA adapter, merge it, evaluate it.

    finetune train                                          # embedded tiny model + bundled demo data (CPU)
    finetune train experiment=qwen2_5_3b_json_qlora         # the real run (GPU)

Steps: validate the config, save it to the run directory, then data -> train -> merge -> eval.
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import run_dir, save_resolved_config, setup, user_errors
from finetune.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg)
        out = run_dir()
        save_resolved_config(cfg, out / "config.yaml")

        from finetune.pipeline import run_training

        run_training(typed, out)


if __name__ == "__main__":
    main()
