"""Third-party warnings that do not apply to a run stay off the console and go to the log file (issue 18)."""
import logging
import warnings

from finetune.cli import quiet_console


def test_inapplicable_warnings_reach_the_log_file_but_not_the_console(tmp_path):
    root = logging.getLogger()
    console, logfile = logging.StreamHandler(), logging.FileHandler(tmp_path / "train.log")
    seen = []
    console.emit = lambda record: seen.append(record.getMessage())  # what the console would print
    root.addHandler(console)
    root.addHandler(logfile)
    try:
        quiet_console()
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning)
        logging.getLogger("finetune").warning("data: 3 rows dropped")
        logfile.flush()
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
        logging.captureWarnings(False)
    assert seen == ["data: 3 rows dropped"]
    text = (tmp_path / "train.log").read_text()
    assert "kernels-community" in text and "is_gradient_checkpointing" in text and "3 rows dropped" in text


def test_the_run_header_names_what_decides_the_run():
    from finetune.config import FinetuneConfig, SourceConfig, validate
    from finetune.pipeline import run_header

    cfg = FinetuneConfig()
    cfg.data.sources = [SourceConfig(path="demo:instruct_train.jsonl")]
    cfg = validate(cfg)
    cfg.train.max_steps, cfg.train.learning_rate, cfg.peft.r = 30, 1e-3, 8
    line = run_header(cfg)
    assert "model embedded:tiny" in line and "30 steps, lr 0.001" in line and "r 8" in line
    assert "merge base nf4_roundtrip" in line  # merge.base=auto after 4-bit training
