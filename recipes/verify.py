"""finetune verify run=<run dir> ['verify.engines=[adapter,gguf,vllm_merged,vllm_lora]'] [verify.thresholds.<engine>=...]

Sends the same held-out prompts, greedy, through the adapter on its training base (transformers + peft), the merged
folder in transformers (the reference), the GGUF export in llama.cpp and vLLM serving the merged folder and the
base + LoRA adapter; writes <run>/verify/report.json and report.md (identical outputs, token agreement, first
divergence, same rendered prompt ids, same end-of-turn stop, per engine), prints a one-line JSON summary, and exits
2 when a pair falls below its threshold. Engines that are not installed are listed as skipped with the install
command.
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

        from finetune.verify.run import verify_run

        report = verify_run(typed, Path(typed.run))
        out = Path(typed.verify.output or Path(typed.run) / "verify")
        print(json.dumps({"report": str(out / "report.md"), "ok": report["ok"],
                          "pairs": {p["engine"]: p.get("token_agreement", p["status"]) for p in report["pairs"]},
                          "skipped": {s["engine"]: s["install"] or s["why"] for s in report["skipped"]}}))


if __name__ == "__main__":
    main()
