"""finetune merge run=<run dir> [merge.base=original|nf4_roundtrip] [merge.overwrite=true]
finetune merge merge.adapter=<adapter dir> model=<its base> [merge.output=<dir>]

Merges the adapter into its base, shard by shard, and writes <run>/merged (or merge.output): safetensors
shards, config, tokenizer with the training chat template, generation_config (eos includes the end-of-turn
token), README.md model card and parity.json (merged vs the adapter as trained). Prints the parity summary.
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

        import json
        from pathlib import Path

        from finetune.merge.stream import merge_adapter

        out = merge_adapter(typed, Path(typed.run) if typed.run else None)
        from finetune.errors import FinetuneError
        from finetune.merge.parity import parity_summary

        parity = parity_summary(out)
        print(json.dumps({"merged": str(out), **parity}))
        if not parity["ok"] and typed.merge.parity_fail:
            raise FinetuneError(f"merge parity: {parity['warning']} The merged folder is written ({out}); "
                                "merge.parity_fail=false only warns")


if __name__ == "__main__":
    main()
