"""finetune preprocess [data overrides] — build the training rows, write data/stats.json, show samples.

    finetune preprocess 'data.sources=[{path:my.jsonl,format:alpaca}]'

Label tokens are marked in the printed samples, so the loss mask can be checked before training.
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import run_dir, save_resolved_config, setup, user_errors
from finetune.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg)
        out = run_dir()
        save_resolved_config(cfg, out / "config.yaml")

        from finetune.data import preview
        from finetune.pipeline import prepare_data

        tokenizer, splits = prepare_data(typed, out)
        print(preview(splits, tokenizer))
        print(f"stats: {out / 'data' / 'stats.json'}")


if __name__ == "__main__":
    main()
