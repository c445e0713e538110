"""Checkpoints and resume, in-process on the tiny model: exact resume, last-K rotation, atomic saves that survive a
crash mid-save, SIGTERM -> checkpoint + stop, and refusing a checkpoint made for another model or LoRA shape."""
import json
import os
import shutil
import signal

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune.train import trainer as train_mod
from finetune.train.checkpoint import META_NAME, REQUIRED_FILES, complete_checkpoints, find_resume_checkpoint, step_of
from finetune.errors import FinetuneError
from finetune.paths import CONFIG_DIR
from finetune.pipeline import prepare_data, resolve_resume
from finetune.config import register_configs, to_typed, validate

register_configs()
FAST = ["train.max_steps=4", "train.save_steps=1", "train.save_total_limit=2", "train.report_to=[]",
        "merge.enabled=false", "device=cpu"]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return validate(to_typed(compose(config_name="config", overrides=[*FAST, *overrides])))


def max_abs_diff(a, b):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tokenizer, splits = prepare_data(compose_cfg(), tmp_path_factory.mktemp("data"))
    return splits, tokenizer  # train()'s argument order


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data):
    """4 uninterrupted steps, a checkpoint after every step, the last 2 kept."""
    run = tmp_path_factory.mktemp("full")
    result = train_mod.train(compose_cfg(), *data, run)
    return run, result


def test_keeps_the_last_k_complete_checkpoints(full_run):
    run, result = full_run
    assert result.steps == 4
    kept = complete_checkpoints(run / "checkpoints")
    assert [step_of(p) for p in kept] == [3, 4]  # save_total_limit=2 removed 1 and 2
    for ckpt in kept:
        assert all((ckpt / f).is_file() for f in (*REQUIRED_FILES, "rng_state.pth", META_NAME))
    assert not list((run / "checkpoints").glob(".tmp-*"))  # no staging left behind


def test_resume_continues_exactly_where_the_checkpoint_left_off(full_run, data, tmp_path):
    run, _ = full_run
    shutil.copytree(run / "checkpoints" / "checkpoint-3", tmp_path / "checkpoints" / "checkpoint-3")
    cfg = compose_cfg()
    start = resolve_resume(cfg, tmp_path)  # train.resume=auto
    assert start == tmp_path / "checkpoints" / "checkpoint-3"
    result = train_mod.train(cfg, *data, tmp_path, resume_from=start)
    assert result.steps == 4 and result.resumed_from == start
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [4]  # one step trained here, not a restart from 0
    # Step 4 needs the restored Adam moments, LR schedule position, dropout RNG and data position to match.
    weights = "adapter/adapter_model.safetensors"
    assert max_abs_diff(run / weights, tmp_path / weights) <= 1e-6
    provenance = json.loads((tmp_path / "adapter/provenance.json").read_text())
    assert provenance["resumed_from"] == str(start) and provenance["steps"] == 4


def test_resume_refuses_a_checkpoint_of_another_model_or_lora_shape(full_run):
    run, _ = full_run
    cfg = compose_cfg("peft.r=8", "peft.use_dora=true", "model=qwen2_5_0_5b_instruct", f"train.resume={run}")
    with pytest.raises(FinetuneError) as err:
        resolve_resume(cfg, run)
    text = str(err.value)
    assert "different base model or LoRA shape" in text
    assert "peft.r: 16 in the checkpoint, 8 now" in text
    assert "peft.use_dora: False in the checkpoint, True now" in text
    assert "model.name_or_path: 'embedded:tiny' in the checkpoint, 'Qwen/Qwen2.5-0.5B-Instruct' now" in text


def test_resume_never_and_explicit_paths(full_run, tmp_path):
    run, _ = full_run
    assert find_resume_checkpoint("never", run) is None
    assert find_resume_checkpoint("auto", tmp_path) is None  # a fresh run directory starts from scratch
    assert find_resume_checkpoint(str(run), tmp_path) == run / "checkpoints/checkpoint-4"
    assert find_resume_checkpoint(str(run / "checkpoints/checkpoint-3"), tmp_path) == run / "checkpoints/checkpoint-3"
    with pytest.raises(FinetuneError, match="no complete checkpoint-N"):
        find_resume_checkpoint(str(tmp_path), tmp_path)


class _SignalAt(TrainerCallback):
    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.sig)  # handled by StopOnSignal, installed around trainer.train()


def _with_callback(monkeypatch, callback):
    build = train_mod.build_trainer

    def patched(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(train_mod, "build_trainer", patched)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(monkeypatch, data, tmp_path):
    _with_callback(monkeypatch, _SignalAt(2, signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train_mod.TrainingStopped) as err:
        train_mod.train(compose_cfg("train.save_steps=100"), *data, tmp_path)
    stop = err.value
    assert stop.signal_name == "SIGTERM" and stop.step == 2
    assert stop.checkpoint == tmp_path / "checkpoints/checkpoint-2"  # saved although save_steps=100
    assert complete_checkpoints(tmp_path / "checkpoints") == [stop.checkpoint]
    assert f"hydra.run.dir={tmp_path}" in str(stop) and "train.resume=auto" in str(stop)
    assert not (tmp_path / "adapter").exists()  # a stopped run leaves no final adapter
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_crash_mid_save_leaves_the_previous_checkpoint_whole(monkeypatch, data, tmp_path):
    cls = train_mod.trainer_class()
    real = cls._save_rng_state

    def failing(self, output_dir):
        if self.state.global_step == 2:
            raise OSError("No space left on device")  # after model + optimizer were written
        real(self, output_dir)

    monkeypatch.setattr(cls, "_save_rng_state", failing)
    with pytest.raises(OSError, match="No space left"):
        train_mod.train(compose_cfg("train.max_steps=3"), *data, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / ".tmp-checkpoint-2").exists()  # the failed save's staging folder is removed at once
    assert not (ckpts / "checkpoint-2").exists()
    assert complete_checkpoints(ckpts) == [ckpts / "checkpoint-1"]
    assert resolve_resume(compose_cfg("train.max_steps=3"), tmp_path) == ckpts / "checkpoint-1"
    assert not (ckpts / ".tmp-checkpoint-2").exists()  # cleaned up before resuming
