"""What a run tells its user: metrics.jsonl, TensorBoard events, eval loss during training, plots/loss.png, the
one-line JSON summary, and the memory plan (logged before training, or alone with train.plan_only=true)."""
import json
import struct

import pytest

from tests.support import run_cli
from finetune.train.plots import plot_losses, read_loss_curves


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logged")
    res = run_cli("train", "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "merge.enabled=false",
                  "device=cpu", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_a_record_per_step_with_throughput_and_memory(run):
    out, _ = run
    train = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"loss", "lr", "grad_norm", "label_tokens_per_s", "peak_memory_mb", "eta_s"} <= r.keys()
        assert r["label_tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
    # label tokens are counted from the labels (-100 excluded): fewer than all tokens trl counts
    assert 0 < train[-1]["label_tokens"] < train[-1]["num_tokens"]
    assert train[0]["lr"] < train[1]["lr"]  # warmup


def test_eval_loss_every_n_steps_and_at_the_end(run):
    out, res = run
    evals = [r for r in records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # eval_steps=2; the last one is also the end-of-run eval
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])


def test_the_final_eval_loss_is_left_to_the_eval_stage_when_it_scores_the_same_rows(tmp_path):
    """merge + eval on every validation row: the trainer makes no end-of-run eval pass (the eval stage's
    target_loss is that loss, on the merged model); a periodic eval or eval.max_samples keeps the pass."""
    res = run_cli("train", "train.max_steps=2", "device=cpu", "eval.max_new_tokens=4", "eval.compare_base=false",
                  f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert not [r for r in records(tmp_path) if "eval_loss" in r]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["eval_loss"] is None and summary["eval"]["target_loss"] > 0
    log = (tmp_path / "train.log").read_text()
    assert "final eval loss left to the eval stage" in log and "first validation batch is finite" in log


def test_tensorboard_events_carry_the_training_scalars(run):
    out, _ = run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_loss_plot_and_summary_line(run):
    out, res = run
    png = out / "plots" / "loss.png"
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (700, 400)  # 7 x 4 inches at 100 dpi
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # the last stdout line is the JSON summary
    assert summary["loss_plot"] == str(png) and summary["steps"] == 4 and summary["resumed_from"] is None
    for key in ("first_loss", "last_loss", "label_tokens_per_s", "peak_memory_mb", "planned_memory_gib"):
        assert isinstance(summary[key], float), key


def test_memory_plan_is_logged_before_training(run):
    out, _ = run
    log = (out / "train.log").read_text()
    assert "accelerator memory plan" in log and "optimizer state" in log
    assert log.index("accelerator memory plan") < log.index("trainable parameters")


def test_loss_curves_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        '{"step": 1, "loss": 3.0}', '{"step": 2, "loss": 2.5}', '{"step": 2, "eval_loss": 2.8}',
        '{"step": 3, "loss": 2.0}', '{"step": 3, "eval_loss": 2.6}', '{"step": 3, "eval_loss": 2.4}',
        '{"step": 4, "lo',  # cut short by a kill
    ]) + "\n")
    curves = read_loss_curves(path)
    assert (curves.train_steps, curves.train_loss) == ([1, 2, 3], [3.0, 2.5, 2.0])
    assert (curves.eval_steps, curves.eval_loss) == ([2, 3], [2.8, 2.4])  # the later record of a step wins
    png = plot_losses(path, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(png.parent.glob("*.tmp*"))


def test_plan_only_prints_the_3b_plan_offline_and_trains_nothing(tmp_path):
    from finetune.train.memory_plan import GIB, plan_memory

    res = run_cli("train", "experiment=qwen2_5_3b_json_qlora", "train.plan_only=true", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "Qwen/Qwen2.5-3B-Instruct" in out and "3.09 B base params" in out
    assert "2048 tokens per micro-batch" in out  # data.max_length 2048 x train.per_device_train_batch_size 1
    # The numbers come from the config's values: the experiment's settings, spelled out here.
    arch = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True)
    plan = plan_memory(arch, quant_method="nf4", double_quant=True, compute_dtype="bfloat16", r=16,
                       target_modules="all-linear", optimizer="adamw_torch", seq_len=2048, micro_batch=1,
                       gradient_checkpointing=True, lora_dropout=0.05, attn_implementation="sdpa",
                       upcast_non_quantized=False)  # quant.fp32_norms=false: norms in the bf16 compute dtype
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[1:] == [f"{plan.total_no_ckpt / GIB:.2f}", f"{plan.total_ckpt / GIB:.2f}"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()


def test_plan_reads_config_json_when_the_model_config_has_no_architecture(tmp_path):
    res = run_cli("train", "model.architecture=null", "train.plan_only=true", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "embedded:tiny" in res.stdout and "LoRA params" in res.stdout


def test_console_shows_one_readable_line_per_record_not_raw_dicts(run):
    """Without a terminal the progress bar is off; each log record is one short line (ConsoleProgress), and
    transformers' printing of the raw record dict is gone."""
    out, res = run
    console = res.stdout + res.stderr
    assert "{'loss'" not in console and "'learning_rate'" not in console
    lines = [line for line in (out / "train.log").read_text().splitlines() if "step 4/4: loss" in line]
    assert lines and "lr " in lines[0] and "label tok/s" in lines[0] and "eta 0:00:00" in lines[0]
