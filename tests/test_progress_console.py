"""Progress a person can read: one training bar with loss / lr / label tokens/s and ETA, and a progress bar on
each long step (generation, target loss, merge, GGUF write). Bars draw only on a terminal, so these tests
give the process a terminal-like stderr."""
import io
import logging
import sys
from types import SimpleNamespace

from finetune.distributed import progress
from finetune.train.callbacks import ConsoleProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _tty(monkeypatch) -> _Terminal:
    # Set inside the test body: pytest puts its own capture back on sys.stderr after fixtures ran.
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    return term


def _state(step: int, max_steps: int = 4):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


def _drive(cb: ConsoleProgress) -> None:
    cb.on_train_begin(None, _state(0), None)
    for step in (1, 2):
        cb.on_step_end(None, _state(step), None)
        cb.on_log(None, _state(step), None, logs={"loss": 2.5 - step / 10, "learning_rate": 1e-4, "grad_norm": 0.3,
                                                   "label_tokens_per_s": 1234.5, "num_tokens": 99.0})
    cb.on_train_end(None, _state(2), None)


def test_training_bar_carries_loss_lr_tokens_and_eta_not_the_raw_record(monkeypatch):
    terminal = _tty(monkeypatch)
    _drive(ConsoleProgress())
    text = terminal.getvalue()
    assert "train:" in text and "2/4" in text
    assert "loss 2.3000" in text and "lr 1.00e-04" in text and "1,234 label tok/s" in text
    assert "<" in text.rsplit("2/4", 1)[1]  # tqdm's [elapsed<remaining]: the ETA
    assert "grad_norm" not in text and "{" not in text  # the raw dict transformers printed is gone


def test_without_a_terminal_each_record_is_one_short_log_line(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY: no bar
    with caplog.at_level(logging.INFO, logger="finetune.train.trainer"):
        _drive(ConsoleProgress())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2
    assert lines[1].startswith("step 2/4: loss 2.3000, lr 1.00e-04, 1,234 label tok/s, eta 0:00:")
    assert sys.stderr.getvalue() == ""


def test_bars_only_on_rank_zero(monkeypatch):
    terminal = _tty(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(progress(range(3), desc="merge")) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_generation_and_target_loss_show_batches(monkeypatch, tiny_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.evaluation.run import target_loss
    from finetune.generate.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    terminal = _tty(monkeypatch)
    prompts = [tiny_tokenizer("hello there")["input_ids"], tiny_tokenizer("a b c")["input_ids"],
               tiny_tokenizer("x")["input_ids"]]
    generate(model, tiny_tokenizer, prompts, max_new_tokens=2, batch_size=2, desc="eval: tuned")
    assert "eval: tuned" in terminal.getvalue() and "2/2" in terminal.getvalue()
    rows = [{"input_ids": p, "assistant_masks": [0] + [1] * (len(p) - 1)} for p in prompts]
    assert target_loss(model, rows, tokens_per_batch=4)["target_tokens"] > 0
    assert "target loss" in terminal.getvalue()


def test_merge_and_gguf_write_show_tensors(monkeypatch, tiny_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.export.gguf import plan_gguf, write_gguf
    from finetune.merge.stream import merge_weights

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    terminal = _tty(monkeypatch)
    info = merge_weights(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert "merge: 100%" in terminal.getvalue() and f"{info['tensors']}/{info['tensors']}" in terminal.getvalue()

    plan = plan_gguf(tiny_dir, "f32")
    write_gguf(plan, tmp_path / "tiny.gguf", "tiny")
    n = len(plan.tensors)
    assert "write GGUF f32" in terminal.getvalue() and f"{n}/{n}" in terminal.getvalue()


def test_gather_strings_without_a_launcher_is_this_process_only():
    from finetune.distributed import gather_strings

    assert gather_strings("abc") == ["abc"]


def test_launcher_start_time_names_the_run(monkeypatch):
    import os
    import time

    import psutil

    from finetune.config.stamp import FORMAT, _process_start_time, run_stamp

    started = _process_start_time(os.getpid())
    assert started == psutil.Process().create_time() and started <= time.time()
    assert _process_start_time(2**22 + 12345) is None  # no such process
    monkeypatch.delenv("FINETUNE_RUN_STAMP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    from datetime import datetime

    assert run_stamp() == datetime.fromtimestamp(psutil.Process(os.getppid()).create_time()).strftime(FORMAT)
