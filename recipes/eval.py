"""finetune eval run=<run dir> [eval.gates.exact_match=0.9 ...] [eval=lm_harness eval.tasks=[...]]

The eval settings are the run's own (its config.yaml), with the command line's eval.* overrides on top;
`eval=<option>` or `experiment=<name>` composes them afresh instead.

Generates on the held-out rows with the merged model (and the base, for comparison), writes
<run>/eval/report.{json,md} and predictions.jsonl, prints the tuned metrics as one JSON line, and
exits 2 naming each gate missed.
"""
import hydra
from omegaconf import DictConfig

from finetune.cli import setup, user_errors
from finetune.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="run_task")
def main(cfg: DictConfig) -> None:
    with user_errors():
        typed = setup(cfg, from_run=True, run_defaults=("eval",))

        import json
        from pathlib import Path

        from finetune.evaluation.run import evaluate_run

        metrics = evaluate_run(typed, Path(typed.run))
        print(json.dumps({"report": str(Path(typed.run) / "eval" / "report.md"), **metrics}))


if __name__ == "__main__":
    main()
