"""The corpus: bad inputs and faults a careful user and an unlucky machine produce, one row each.

Each row: the command (`finetune <recipe> ...`), the exit code it must give, words its message must contain.
Every row is also checked for a traceback and for anything half-written (tests/reliability/harness.py). Most
rows fail at the config, data or artifact checks before any model loads, so the corpus stays fast.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.reliability.harness import Case

# A train run as short as possible (2 optimizer steps, tiny model, CPU, no loggers).
FAST = ["train.max_steps=2", "train.save_steps=1", "train.report_to=[]", "device=cpu", "eval.compare_base=false",
        "eval.max_samples=2", "eval.max_new_tokens=4", "merge.parity_prompts=1"]


def train(*overrides: str):
    return lambda tmp, art: ["train", *FAST, *overrides, f"hydra.run.dir={tmp / 'run'}"]


def preprocess_with(source: str, fmt: str = "alpaca", *extra: str):
    def argv(tmp, art):
        return ["preprocess", f"data.sources=[{{path:{tmp / source},format:{fmt}}}]", "device=cpu", *extra,
                f"hydra.run.dir={tmp / 'run'}"]
    return argv


def write(name: str, data: bytes | str):
    def setup(tmp, art):
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def on_run(recipe: str, *overrides: str):
    """A run-task command on the corpus' copy of the trained run (tmp/run)."""
    return lambda tmp, art: [recipe, f"run={tmp / 'run'}", "device=cpu", *overrides]


def copy_run(tmp: Path, art: dict) -> Path:
    run = tmp / "run"
    shutil.copytree(art["run"], run, symlinks=True)
    return run


def damaged(fn):
    """setup: copy the trained run, then break something in it with fn(run)."""
    def setup(tmp, art):
        fn(copy_run(tmp, art), tmp, art)
    return setup


def _truncate(path: Path, keep: int = 100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _merged_weights(run: Path) -> Path:
    return sorted((run / "merged").glob("*.safetensors"))[0]


def _swap_adapter(run: Path, tmp, art):
    """merged/ made from another adapter: the adapter weights changed after the merge (retrained)."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v + 0.01 for k, v in tensors.items()}, path)


def _other_base(run: Path, tmp, art):
    """merged/ says it came from another base model."""
    path = run / "merged" / "provenance.json"
    prov = json.loads(path.read_text())
    prov["base"] = {**prov["base"], "name": "Qwen/Qwen2.5-0.5B-Instruct", "config_sha256": "0" * 64}
    path.write_text(json.dumps(prov))


def base_copy(broken: str):
    """setup: a copy of the tiny base model in tmp/base, broken as named."""
    def setup(tmp, art):
        from finetune.models.tiny import tiny_model_dir

        base = tmp / "base"
        shutil.copytree(tiny_model_dir(), base)
        weights = base / "model.safetensors"
        if broken == "bin-only":
            weights.rename(base / "pytorch_model.bin")
        elif broken == "truncated":
            _truncate(weights, weights.stat().st_size // 2)
        elif broken == "garbage":
            weights.write_bytes(b"\xff" * 4096)
    return setup


def _nothing_written(tmp, art, out):
    run = tmp / "run"
    assert not (run / "config.yaml").exists(), "a refused config must not write config.yaml"
    assert not (run / "adapter").exists() and not (run / "checkpoints").exists()


def _no_run_dir(tmp, art, out):
    assert not (tmp / "run").exists(), "the command line check must refuse before Hydra makes a run directory"


NUMBERS = [  # (override, words): every one of them passed validation before issue 15
    ("train.learning_rate=inf", "train.learning_rate=inf"), ("train.learning_rate=nan", "train.learning_rate=nan"),
    ("train.learning_rate=-inf", "not a finite number"), ("train.learning_rate=0", "must be positive"),
    ("peft.lora_alpha=inf", "peft.lora_alpha=inf"), ("peft.lora_alpha=nan", "peft.lora_alpha=nan"),
    ("peft.lora_dropout=nan", "peft.lora_dropout"), ("peft.lora_dropout=1.0", "[0, 1)"),
    ("train.max_grad_norm=nan", "train.max_grad_norm=nan"), ("train.max_grad_norm=inf", "not a finite"),
    ("train.max_grad_norm=-1", "must be >= 0"), ("train.weight_decay=nan", "train.weight_decay"),
    ("train.weight_decay=-0.1", "must be >= 0"), ("train.warmup_steps=nan", "train.warmup_steps"),
    ("train.warmup_steps=inf", "train.warmup_steps"), ("train.warmup_steps=2.5", "fraction"),
    ("train.neftune_noise_alpha=nan", "train.neftune_noise_alpha"), ("train.seed=4294967296", "2^32"),
    ("train.seed=-1", "train.seed"), ("eval.seed=99999999999", "eval.seed"),
    ("generate.seed=4294967296", "generate.seed"), ("data.seed=4294967296", "data.seed"),
    ("data.val_fraction=nan", "data.val_fraction"), ("data.val_fraction=1.0", "[0, 1)"),
    ("data.max_bad_fraction=nan", "data.max_bad_fraction"), ("eval.temperature=nan", "eval.temperature"),
    ("eval.top_p=inf", "eval.top_p"), ("generate.temperature=nan", "generate.temperature"),
    ("generate.top_p=nan", "generate.top_p"), ("merge.parity_threshold=nan", "merge.parity_threshold"),
    ("verify.thresholds.gguf=nan", "verify.thresholds.gguf"), ("eval.gates.exact_match=nan", "eval.gates"),
    ("eval.gates.exact_match=1.5", "[0, 1]"), ("eval.gates.max_target_loss=inf", "max_target_loss"),
    ("eval.max_new_tokens=100000000", "1..8192"), ("eval.max_new_tokens=0", "1..8192"),
    ("generate.max_new_tokens=9000", "1..8192"), ("peft.r=0", "peft.r=0"), ("train.max_steps=0", "train.max_steps"),
    ("train.num_train_epochs=nan", "train.num_train_epochs"),
]

CONFIG = [  # (overrides, words)
    (["device=tpu"], "device='tpu'"), (["quant.method=nf5"], "quant.method"), (["train.optim=adam"], "train.optim"),
    (["train.report_to=[foo]"], "train.report_to"), (["model.context_length=0"], "model.context_length"),
    (["model.context_length=256", "data.max_length=512"], "exceeds model.context_length"),
    (["model.name_or_path=/nonexistent/model"], "no such folder"),
    (["model.name_or_path=./models/missing"], "no such folder"),
    (["model.chat_template=templates/chatml.jinja"], "no such file"),
    (["model.chat_template=my_template"], "not Jinja template text"),
    (["model.attn_implementation=flash_attention_2"], "flash-attn"),
    (["peft.r=4096"], "exceeds the model's hidden size"),
    (["train.resume=/nonexistent/checkpoint"], "no complete checkpoint"),
    (["peft.target_modules=[nope_proj]"], "nope_proj"),
    (["peft.bias=some"], "peft.bias"), (["train.lr_scheduler_type=warp"], "train.lr_scheduler_type"),
]

ARGV = [  # refused by finetune.config.argv before Hydra runs (no run directory appears)
    (["train.foo=1"], "unknown config key 'train.foo'"), (["train.learnin_rate=1e-4"], "did you mean train.learning_rate"),
    (["+train.foo=1"], "unknown config key"), (["evals.max_new_tokens=3"], "the top level has no 'evals'"),
    (["name=../../.."], "outputs/"), (["name=a/b"], "no slashes"), (["name=.."], "not . or .."),
]


def cases() -> list[Case]:
    out: list[Case] = []
    for ov, words in NUMBERS:
        out.append(Case(f"number:{ov}", train(ov), 2, (words,), check=_nothing_written))
    for ovs, words in CONFIG:
        out.append(Case(f"config:{' '.join(ovs)}", train(*ovs), 2, (words,), check=_nothing_written))
    for ovs, words in ARGV:
        out.append(Case(f"argv:{' '.join(ovs)}", train(*ovs), 2, (words,), check=_no_run_dir))

    # Data files.
    good = '{"instruction": "hi", "output": "hello"}\n'
    data = [
        ("missing file", None, preprocess_with("nope.jsonl"), ("nope.jsonl",)),
        ("a folder as data file", lambda t, a: (t / "dir.jsonl").mkdir(), preprocess_with("dir.jsonl"), ("dir.jsonl",)),
        ("latin-1 data", write("l1.jsonl", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1")),
         preprocess_with("l1.jsonl"), ("l1.jsonl",)),
        ("empty file", write("empty.jsonl", ""), preprocess_with("empty.jsonl"), ("read 0 rows",)),
        ("not json", write("bad.jsonl", "this is not json\n" * 5), preprocess_with("bad.jsonl"), ("bad.jsonl",)),
        ("wrong format", write("w.jsonl", good * 5), preprocess_with("w.jsonl", "sharegpt"), ("w.jsonl",)),
        ("truncated last line", write("cut.jsonl", good * 3 + '{"instruction": "x", "outp'),
         preprocess_with("cut.jsonl", "alpaca", "data.on_error=raise"), ("cut.jsonl",)),
        ("binary garbage", write("bin.jsonl", bytes(range(256)) * 4), preprocess_with("bin.jsonl"), ("bin.jsonl",)),
        ("unknown format", write("u.jsonl", good), preprocess_with("u.jsonl", "alpacca"), ("data.sources[0].format",)),
        ("parquet that is text", write("p.parquet", good), preprocess_with("p.parquet"), ("p.parquet",)),
        ("csv without columns", write("c.csv", "a,b\n1,2\n"), preprocess_with("c.csv"), ("c.csv",)),
    ]
    for name, setup, argv, words in data:
        out.append(Case(f"data:{name}", argv, 2, words, setup=setup))

    # Base model folders.
    bases = [
        ("bin-only weights, found at start", "bin-only", (".bin weights", "merge.enabled=false"), "train"),
        ("truncated base safetensors", "truncated", ("model",), "train"),
        ("garbage base safetensors", "garbage", ("model",), "train"),
        # the weights fingerprint differs from the adapter's base: refused before a tensor is read
        ("truncated base safetensors at merge", "truncated", ("do not belong together", "weights_fingerprint"),
         "merge"),
    ]
    for name, broken, words, recipe in bases:
        if recipe == "train":
            argv = (lambda t, a: ["train", *FAST, f"model.name_or_path={t / 'base'}", "quant=none",
                                  f"hydra.run.dir={t / 'run'}"])
        else:
            argv = (lambda t, a: ["merge", f"merge.adapter={a['run'] / 'adapter'}", f"merge.output={t / 'm'}",
                                  f"model.name_or_path={t / 'base'}", "device=cpu"])
        out.append(Case(f"base:{name}", argv, 2, words, setup=base_copy(broken), needs_run=recipe == "merge"))

    # Artifacts of a trained run (a copy per case).
    art = [
        ("run= missing", None, lambda t, a: ["eval", f"run={t / 'none'}", "device=cpu"], 2, ("config.yaml not found",)),
        ("run= a file", write("afile", "x"), lambda t, a: ["merge", f"run={t / 'afile'}", "device=cpu"], 2,
         ("is a file",)),
        ("run= without config.yaml", lambda t, a: (t / "empty_run").mkdir(),
         lambda t, a: ["generate", f"run={t / 'empty_run'}", "device=cpu"], 2, ("config.yaml",)),
        ("bad run config.yaml", damaged(lambda r, t, a: (r / "config.yaml").write_text("model: [unclosed\n")),
         on_run("eval"), 2, ("config.yaml", "cannot be read")),
        ("run config.yaml not a mapping", damaged(lambda r, t, a: (r / "config.yaml").write_text("- 1\n- 2\n")),
         on_run("eval"), 2, ("config.yaml",)),
        ("eval without merged/", damaged(lambda r, t, a: shutil.rmtree(r / "merged")), on_run("eval"), 2,
         ("merged",)),
        ("truncated merged weights", damaged(lambda r, t, a: _truncate(_merged_weights(r))), on_run("eval"), 2,
         ("safetensors",)),
        ("merged without config.json", damaged(lambda r, t, a: (r / "merged" / "config.json").unlink()),
         on_run("export"), 2, ("merged",)),
        ("merged from another adapter", damaged(_swap_adapter), on_run("eval"), 2, ("do not belong together",)),
        ("merged from another base (eval)", damaged(_other_base), on_run("eval"), 2,
         ("do not belong together", "Qwen/Qwen2.5-0.5B-Instruct")),
        ("merged from another base (export)", damaged(_other_base), on_run("export", "export.verify=none"), 2,
         ("do not belong together",)),
        ("merged from another base (generate)", damaged(_other_base), on_run("generate"), 2,
         ("do not belong together",)),
        ("merge onto another base", damaged(lambda r, t, a: None),
         lambda t, a: ["merge", f"merge.adapter={t / 'run' / 'adapter'}", f"merge.output={t / 'm2'}",
                       f"model.name_or_path={a['other_base']}", "device=cpu"], 2,
         ("do not belong together",)),
        ("merge exists", damaged(lambda r, t, a: None), on_run("merge"), 2, ("merge.overwrite=true",)),
        ("adapter missing", damaged(lambda r, t, a: shutil.rmtree(r / "adapter")),
         on_run("merge", "merge.overwrite=true"), 2, ("adapter",)),
        ("adapter_config.json not JSON", damaged(lambda r, t, a: (r / "adapter" / "adapter_config.json")
                                                  .write_text("{")), on_run("merge", "merge.overwrite=true"), 2,
         ("adapter_config.json",)),
        ("latin-1 prompts", damaged(lambda r, t, a: (t / "p.jsonl").write_bytes(
            '{"prompt": "caf\xe9"}\n'.encode("latin-1"))), lambda t, a: ["generate", f"run={t / 'run'}",
                                                                         f"generate.prompts={t / 'p.jsonl'}",
                                                                         "device=cpu"], 2, ("not UTF-8", "p.jsonl")),
        ("prompts missing", damaged(lambda r, t, a: None),
         lambda t, a: ["generate", f"run={t / 'run'}", f"generate.prompts={t / 'nope.jsonl'}", "device=cpu"], 2,
         ("file not found",)),
        ("generate.output a directory", damaged(lambda r, t, a: (t / "outdir").mkdir()),
         lambda t, a: ["generate", f"run={t / 'run'}", f"generate.output={t / 'outdir'}", "device=cpu"], 2,
         ("is a directory",)),
        ("damaged adapter provenance", damaged(lambda r, t, a: (r / "adapter" / "provenance.json").write_text("{")),
         on_run("eval"), 2, ("provenance.json", "not valid JSON")),
        ("export exists", damaged(lambda r, t, a: (r / "export" / "gguf-f16").mkdir(parents=True)),
         on_run("export"), 2, ("export.overwrite=true",)),
    ]
    for name, setup, argv, code, words in art:
        out.append(Case(f"artifact:{name}", argv, code, words, setup=setup, needs_run=True))

    # Training state of a run directory.
    def resume_argv(*ov):
        return lambda t, a: ["train", *FAST, *ov, f"hydra.run.dir={t / 'run'}"]
    state = [
        ("finished run re-run", damaged(lambda r, t, a: None), resume_argv(), 0, ("is finished", "nothing to train")),
        ("resume=never into a finished run", damaged(lambda r, t, a: None), resume_argv("train.resume=never"), 2,
         ("train.overwrite=true", "already holds a run")),
        ("resume with a changed learning rate", damaged(lambda r, t, a: shutil.rmtree(r / "adapter")),
         resume_argv("train.learning_rate=1e-3"), 2, ("train.learning_rate", "train.allow_changes=true")),
        ("resume onto another LoRA shape", damaged(lambda r, t, a: shutil.rmtree(r / "adapter")),
         resume_argv("peft.r=8"), 2, ("peft.r",)),
        ("lock held by a live process", damaged(lambda r, t, a: (r / ".lock").write_text(
            json.dumps({"pid": a["live_pid"], "started": a["live_started"], "host": a["host"]}))),
         resume_argv(), 2, ("in use by another run",)),
        ("run directory is a file", write("run", "x"), train(), 2, ("run",)),
    ]
    for name, setup, argv, code, words in state:
        out.append(Case(f"state:{name}", argv, code, words, setup=setup, needs_run=True))
    return out
