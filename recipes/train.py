"""finetune train [overrides] — train a LoRA/QLoRA adapter, merge it, evaluate it.

    finetune train                                          # embedded tiny model + bundled demo data (CPU)
    finetune train experiment=qwen2_5_3b_json_qlora         # the real run (GPU)
    finetune train experiment=qwen2_5_3b_json_qlora train.plan_only=true   # memory plan only, nothing loads
    finetune train <same overrides> hydra.run.dir=<run>     # continue a stopped run from its last checkpoint

Steps: validate the config, check the checkpoint to resume from (if any), save the config to the run
directory, then data -> train -> merge -> eval.
"""
import shlex
import sys

import hydra
from omegaconf import DictConfig

from finetune.cli import run_dir, save_resolved_config, setup, user_errors
from finetune.config import register_configs

register_configs()


def resume_command(out) -> str:
    """The command line that continues this run: the same overrides, pinned to this run directory."""
    from hydra.core.hydra_config import HydraConfig

    task = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    return shlex.join(["finetune", "train", *task, f"hydra.run.dir={out}"])


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg)
        if typed.train.plan_only:
            from finetune.pipeline import plan_text

            print(plan_text(typed))
            return
        out = run_dir()

        from finetune.distributed import is_main_process
        from finetune.pipeline import run_training
        from finetune.train.trainer import TrainingStopped

        def save_config() -> None:  # after the checks: refused settings must not overwrite the run's config.yaml
            if is_main_process():  # under torchrun/accelerate only rank 0 writes into the run directory
                save_resolved_config(cfg, out / "config.yaml")

        try:
            run_training(typed, out, before_write=save_config)
        except TrainingStopped as stop:
            print(f"training stopped by {stop.signal_name} at step {stop.step}; checkpoint saved: {stop.checkpoint}\n"
                  f"resume with: {resume_command(out)}", file=sys.stderr)
            sys.exit(143 if stop.signal_name == "SIGTERM" else 130)  # 128 + signal number, as shells report


if __name__ == "__main__":
    main()
