"""Third-party warnings that do not apply to a run stay off the console and go to the log file (issue 18)."""
import logging

from finetune.cli import quiet_console


def test_inapplicable_warnings_reach_the_log_file_but_not_the_console(tmp_path):
    root = logging.getLogger()
    console, logfile = logging.StreamHandler(), logging.FileHandler(tmp_path / "train.log")
    root.addHandler(console)
    root.addHandler(logfile)
    try:
        quiet_console()
        records = {
            "bnb": logging.makeLogRecord({"name": "bitsandbytes.backends.cpu.ops", "levelno": logging.WARNING,
                                          "msg": "Failed to load CPU gemm_4bit_forward from kernels-community"}),
            "deprecation": logging.makeLogRecord({"name": "py.warnings", "levelno": logging.WARNING,
                                                  "msg": "`is_gradient_checkpointing` is deprecated, use ..."}),
            "ours": logging.makeLogRecord({"name": "finetune", "levelno": logging.WARNING, "msg": "3 rows dropped"}),
        }
        shown = {k: bool(console.filter(r)) for k, r in records.items()}
        logged = {k: bool(logfile.filter(r)) for k, r in records.items()}
    finally:
        root.removeHandler(console)
        root.removeHandler(logfile)
        logging.captureWarnings(False)
    assert shown == {"bnb": False, "deprecation": False, "ours": True}
    assert logged == {"bnb": True, "deprecation": True, "ours": True}  # the log file keeps everything


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
