"""Golden first losses of the tiny model's demo training, as torchtune's recipe tests keep them: a silent change
anywhere on the training path (data formatting, chat template, loss mask, packing, LoRA init, optimizer, LR
schedule, the loss itself) moves these numbers.

The run is `finetune train` minus the command line (compose -> validate -> finetune.pipeline.run_training), on
CPU in fp32 (quant=none: bitsandbytes' CPU 4-bit kernels compute in bf16 and pick kernels by instruction set),
seeded, 5 optimizer steps of the demo's structured rows, nothing merged or evaluated (about 15-40 s here).

Refresh after an intended change (or after a torch / CPU change moved the fifth digit):

    FINETUNE_GOLDEN_PRINT=1 .venv/bin/python -m pytest -q -s tests/test_golden_losses.py

prints the measured values; paste them into GOLDEN_LOSSES / GOLDEN_TOKENS and say in the commit why they moved.
The token counts are integers of the data path alone and must not move with the CPU or torch; the losses are
floats of the whole forward/backward/update and may (first recorded on an AMD EPYC with AVX512-BF16, torch 2.13.0
CPU, December 2026, from commit 647eb76's library; two runs and 1 vs 2 threads agreed bit for bit; an AVX2-only
EPYC gave the same values; refreshed there on 2026-12-03 for shared-prefix packing).
"""
import json
import os

import pytest

STEPS = 5
OVERRIDES = [
    "experiment=tiny_demo",  # the tiny model's demo settings (learning rate, batch, warmup)
    "quant=none", "quant.compute_dtype=float32", "device=cpu", f"train.max_steps={STEPS}", "train.seed=42",
    "train.save_steps=1000",
    "train.report_to=[]", "merge.enabled=false", "eval.enabled=false",
    "data.cache=false",  # build the rows afresh: the golden losses must come from this code, not from any cache
    # pinned here, so that a change of the demo's default data mix is not mistaken for a training change
    "data.sources=[{path:demo:structured_train.jsonl,format:structured,split:train},"
    "{path:demo:structured_val.jsonl,format:structured,split:val}]",
]
# step -> training loss logged in metrics.jsonl
GOLDEN_LOSSES = {1: 12.192187309265137, 2: 12.406684875488281, 3: 11.851358413696289, 4: 11.20097541809082,
                 5: 10.036860466003418}
# step -> (label tokens so far, all tokens so far): the loss mask and the rows each step consumed. "All tokens" are
# those computed: shared-prefix packing (train.share_prefixes) took them from 1,423 to 905 in the first step, and
# with it the LoRA dropout masks are drawn over fewer tokens, which moved the losses from step 3 on (1, 2: the
# adapter's B is still zero). Without dropout both layouts give the same losses (tests/test_shared_prefix.py).
GOLDEN_TOKENS = {1: (212, 905), 2: (423, 1801), 3: (635, 2703), 4: (847, 3611), 5: (1055, 4501)}


def run_demo(run_dir, overrides=None):
    from hydra import compose, initialize_config_dir

    from finetune.config import register_configs, to_typed, validate
    from finetune.paths import CONFIG_DIR
    from finetune.pipeline import run_training

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=OVERRIDES if overrides is None else overrides)
    run_training(validate(to_typed(raw)), run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_first_losses_and_token_counts_match_the_recorded_run(tmp_path):
    logged = run_demo(tmp_path)
    losses = {r["step"]: r["loss"] for r in logged}
    tokens = {r["step"]: (r["label_tokens"], int(r["num_tokens"])) for r in logged}
    if os.environ.get("FINETUNE_GOLDEN_PRINT"):
        print(f"\nGOLDEN_LOSSES = {losses!r}\nGOLDEN_TOKENS = {tokens!r}")
    assert list(losses) == list(range(1, STEPS + 1))
    assert tokens == GOLDEN_TOKENS
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=0)
