"""`finetune <recipe> [hydra overrides]`: find the recipe script and run it; helpers recipes share.

Recipes are scripts (recipes/*.py, shipped inside the wheel as finetune/recipes), not library code:
this dispatcher runs the chosen one as __main__ so Hydra sees a normal command line.
"""
from __future__ import annotations

import contextlib
import logging
import runpy
import sys
from pathlib import Path
from typing import Iterator

from finetune.errors import FinetuneError
from finetune.paths import RECIPES_DIR

RECIPES = {
    "train": "train an adapter on the configured data, then merge and evaluate it (the default job)",
    "preprocess": "build the training data, write data/stats.json and show samples with labels marked",
    "merge": "merge a run's adapter into its base: run=<run dir>",
    "eval": "generate on held-out rows, score, gate: run=<run dir>",
    "generate": "generate replies for a prompts file (or the val split): run=<run dir>",
    "export": "GGUF file + Ollama Modelfile of a run's merged model, read back by llama.cpp: run=<run dir>",
    "verify": "the same prompts through adapter, merged, llama.cpp and vLLM; one parity report: run=<run dir>",
}

USAGE = """usage: finetune <recipe> [hydra overrides]

recipes:
{recipes}

examples:
  finetune train                                  # the embedded offline demo
  finetune train experiment=qwen2_5_3b_json_qlora train.max_steps=500
  finetune train --cfg job                        # print the composed config
  finetune train -m train.learning_rate=1e-4,2e-4 # a sweep (Hydra multirun)
  finetune eval run=outputs/demo/<time> eval.gates.exact_match=0.9

`finetune <recipe> --help` shows that recipe's config groups and options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, RECIPES))
        print(USAGE.format(recipes="\n".join(f"  {n:<{width}}  {d}" for n, d in RECIPES.items())))
        return 0
    name, rest = argv[0], argv[1:]
    script = RECIPES_DIR / f"{name}.py"
    if name not in RECIPES or not script.is_file():
        print(f"finetune: unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    from finetune.config import FinetuneConfig
    from finetune.config.argv import argv_problems
    from finetune.errors import ConfigError

    problems = argv_problems(rest, FinetuneConfig)  # before Hydra creates a run directory (finetune.config.argv)
    if problems:
        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *rest, *_quiet_rank_overrides(rest)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _quiet_rank_overrides(rest: list[str], env: dict | None = None) -> list[str]:
    """Under torchrun / accelerate every rank runs this command in the same run directory: ranks other than 0
    log to the console only and leave <run>/.hydra to rank 0, so <run>/train.log is one process's log rather
    than lines of every rank interleaved. A user's own choice of either setting wins."""
    from finetune.distributed import launch_info  # stdlib imports only: no cost on the start-up path

    if launch_info(env).is_main:
        return []
    extra = []
    if not any(a.startswith(("hydra/job_logging=", "+hydra/job_logging=")) for a in rest):
        extra.append("hydra/job_logging=stdout")
    if not any(a.startswith("hydra.output_subdir=") for a in rest):
        extra.append("hydra.output_subdir=null")
    return extra


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a FinetuneError as one clear message and exit 2, instead of a traceback."""
    try:
        yield
    except FinetuneError as e:
        logging.getLogger("finetune").debug("error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # disk full, permissions, encodings, damaged files: a message (finetune.errors)
        from finetune.errors import user_message

        message = user_message(e)
        if message is None:
            raise  # a bug: keep the traceback
        logging.getLogger("finetune").debug("error", exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# Third-party messages that never apply to a finetune run: shown in the run's log file, not on the console.
NOT_FOR_THE_CONSOLE = (
    "kernels-community",  # bitsandbytes on CPU: an optional Hub kernel package; its own fallback runs (any quant)
    "is_gradient_checkpointing` is deprecated",  # transformers 5.24 about its own internal call (trl, peft)
    "`gradient_checkpointing` is deprecated",
)


class _ConsoleFilter:
    def filter(self, record) -> bool:
        text = record.getMessage()
        return not any(s in text for s in NOT_FOR_THE_CONSOLE)


def quiet_console() -> None:
    """Route Python warnings through logging and keep the inapplicable ones above off the console handlers."""
    import logging

    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
                handler.addFilter(_ConsoleFilter())


def setup(cfg, *, from_run: bool = False, run_defaults: tuple[str, ...] = ()):
    """Validate a composed DictConfig into typed dataclasses.

    With from_run, the groups that describe the trained model (model, quant, peft, data, train, name)
    come from `<run>/config.yaml`, so `finetune merge run=...` uses what the run was trained with;
    merge/eval/generate/device come from the command line. A group named in `run_defaults` starts from the
    run's saved values too, with this command line's `<group>.<key>=...` overrides on top (`run_group`).
    """
    from omegaconf import OmegaConf

    from finetune.config import to_typed, validate

    quiet_console()
    if from_run:
        if not cfg.get("run"):
            raise FinetuneError("this recipe needs a run directory: add run=<run dir> (e.g. run=outputs/demo/<time>)")
        saved = Path(cfg.run) / "config.yaml"
        if not saved.is_file():
            raise FinetuneError(f"run={cfg.run}: {saved} not found; is this a run directory made by `finetune train`?")
        try:
            trained = OmegaConf.load(saved)
        except Exception as e:  # YAML syntax, not UTF-8, not a mapping
            raise FinetuneError(f"run={cfg.run}: {saved} cannot be read ({str(e).splitlines()[0][:200]}); restore "
                                "it from the run's .hydra/config.yaml, or train again") from None
        if not OmegaConf.is_dict(trained) or "model" not in trained:
            raise FinetuneError(f"run={cfg.run}: {saved} is not a run config (no model: section); restore it from "
                                "the run's .hydra/config.yaml, or train again")
        cfg = OmegaConf.merge(cfg, {k: trained[k] for k in ("name", "model", "quant", "peft", "data", "train")
                                    if k in trained})
        for group in run_defaults:
            saved_group = run_group(trained, group)
            if saved_group is not None:
                cfg = OmegaConf.merge(cfg, {group: saved_group})
                logging.getLogger("finetune").info("%s settings: the run's (%s), with this command line's %s.* "
                                                   "overrides", group, saved, group)
    return validate(to_typed(cfg))


def run_group(trained, group: str):
    """The run's saved `group` with this command line's `group.key=value` overrides applied, or None where the
    command line composes that group afresh (`eval=lm_harness`, an `experiment=`) or the run has none.

    `finetune eval run=<demo run>` then decodes and gates as the demo's own evaluation did (its 80 new tokens
    and its gates), not with the eval group's defaults (256 new tokens: the base's rambling took 383 s there
    instead of 151 on a 2-core AVX2 EPYC, 2026-12-03)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if group not in trained:
        return None
    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(given)
    if any(o.key_or_group in (group, "experiment") for o in parsed):
        return None
    out = OmegaConf.create(OmegaConf.to_container(trained[group]))
    for o in parsed:  # `~eval.key` never gets here: Hydra refuses to delete keys of the eval group
        if o.key_or_group.startswith(group + ".") and not o.is_delete():
            OmegaConf.update(out, o.key_or_group[len(group) + 1:], o.value(), merge=False, force_add=True)
    return out


def run_dir() -> Path:
    """The Hydra run (or multirun job) directory of this invocation."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def save_resolved_config(cfg, path: Path) -> None:
    """config.yaml: the fully resolved config; `finetune train --config-path DIR --config-name config` reruns it."""
    from omegaconf import OmegaConf

    from finetune.files import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
