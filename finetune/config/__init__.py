"""Typed schema of the whole config tree.

Hydra composes YAML onto these dataclasses (registered in the ConfigStore), so an unknown key or a
wrong type fails at compose time with the key named. `validate` then checks values and combinations
and reports every problem at once. Library code receives these dataclasses, never a DictConfig.
May import: errors, paths, files (no torch, no model code: config errors must come fast).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from finetune.errors import ConfigError
from finetune.config.data import DataConfig, SourceConfig
from finetune.config.model import ModelConfig
from finetune.config.peft import PeftConfig
from finetune.config.quant import QuantConfig
from finetune.config.eval import EvalConfig, EvalGates
from finetune.config.export import ExportConfig
from finetune.config.generate import GenerateConfig
from finetune.config.merge import MergeConfig
from finetune.config.numbers import non_finite_problems
from finetune.config.train import CUDA_OPTIMIZERS, TrainConfig
from finetune.config.verify import VerifyConfig

__all__ = [
    "FinetuneConfig", "ModelConfig", "QuantConfig", "PeftConfig", "DataConfig", "SourceConfig",
    "TrainConfig", "EvalConfig", "EvalGates", "MergeConfig", "GenerateConfig", "ExportConfig", "VerifyConfig", "register_configs", "to_typed", "validate",
]


@dataclass
class FinetuneConfig:
    name: str = field(default="demo", metadata={"help": "Experiment name; runs go to outputs/<name>/<time>."})
    run: Optional[str] = field(default=None, metadata={"help": "An existing run directory (merge/eval/generate)."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)


def model_slug(name_or_path: str) -> str:
    """A directory-safe run name from a model id: 'Qwen/Qwen2.5-3B-Instruct' -> 'qwen2.5-3b-instruct'."""
    import re

    last = str(name_or_path).rstrip("/").replace("embedded:", "").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.") or "run"


def register_configs() -> None:
    """Register the schema so that `configs/config.yaml` can name it first in its defaults list."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from finetune.config.stamp import run_stamp

    # ${run_stamp:} names run directories; use_cache keeps one value for the whole process.
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
    # oc.select falls back only when a key is missing; `run` is always present (null by default).
    OmegaConf.register_new_resolver("run_or", lambda run, default: run or default, replace=True)
    # ${model_slug:${model.name_or_path}} names a run after its model unless an experiment names it.
    OmegaConf.register_new_resolver("model_slug", model_slug, replace=True)
    cs = ConfigStore.instance()
    # Group files merge into the typed nodes of this schema, so they are checked against it too.
    cs.store(name="finetune_schema", node=FinetuneConfig)


def to_typed(cfg: Any) -> FinetuneConfig:
    """Turn a composed DictConfig (or a plain dict) into dataclasses."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), cfg)
    elif OmegaConf.get_type(cfg) is not FinetuneConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), cfg)
    return OmegaConf.to_object(cfg)


def cross_field_problems(cfg: FinetuneConfig) -> list[str]:
    """Problems that involve more than one group."""
    out = []
    # The name becomes a folder under outputs/: name=../../.. used to put the run outside it.
    if not cfg.name.strip() or "/" in cfg.name or "\\" in cfg.name or cfg.name.strip(".") == "":
        out.append(f"name={cfg.name!r}: the experiment name becomes a folder under outputs/; use letters, digits, "
                   "- _ . (no slashes, not . or ..)")
    if cfg.device not in ("auto", "cpu", "cuda"):
        out.append(f"device={cfg.device!r}: use auto, cpu or cuda")
    # device=auto is resolved in the trainer's preflight (finetune.train.sft.environment_problems), which reports
    # this together with the checks that need the model's config; an explicit device=cpu is refused here.
    if cfg.train.optim in CUDA_OPTIMIZERS and cfg.device == "cpu":
        out.append(f"train.optim={cfg.train.optim!r} needs CUDA (bitsandbytes optimizers), and device=cpu; "
                   "use train.optim=adamw_torch")
    if cfg.peft.use_dora and cfg.quant.method == "int8":
        out.append("peft.use_dora=true with quant.method=int8: peft's DoRA does not support 8-bit layers; "
                   "use quant=nf4 or quant=none")
    init = str(cfg.peft.init_lora_weights).lower()
    if init.startswith("pissa") and cfg.quant.is_quantized:
        out.append("peft.init_lora_weights=pissa needs an unquantized base (quant=none); "
                   "for a 4-bit base use loftq")
    if init == "loftq" and not cfg.quant.is_4bit:
        out.append(f"peft.init_lora_weights=loftq fits the adapter to the quantization error of a 4-bit base, but "
                   f"quant.method={cfg.quant.method!r}; use quant=nf4 (or fp4)")
    if init == "loftq" and cfg.merge.enabled and cfg.merge.base == "original":
        out.append("peft.init_lora_weights=loftq with merge.base=original: the adapter corrects the 4-bit base's "
                   "error, so merging it into the original weights adds that correction twice; use "
                   "merge.base=nf4_roundtrip")
    if cfg.merge.base == "nf4_roundtrip" and not cfg.quant.is_4bit:
        out.append(f"merge.base=nf4_roundtrip needs a 4-bit run, but quant.method={cfg.quant.method!r}; "
                   "use merge.base=original")
    for key, mode in (("generate.constrain", cfg.generate.constrain), ("eval.constrain", cfg.eval.constrain)):
        if mode == "json_schema" and cfg.data.structured.key_order != "schema":
            out.append(f"{key}=json_schema writes object keys in the schema's order, but "
                       f"data.structured.key_order={cfg.data.structured.key_order!r} trains another order; "
                       "use data.structured.key_order=schema")
    ctx = cfg.model.context_length  # null: checked against the model's config.json in the preflight
    if ctx is not None and cfg.data.max_length > ctx:
        out.append(f"data.max_length={cfg.data.max_length} exceeds model.context_length={ctx}")
    if ctx is not None and cfg.generate.max_new_tokens > ctx:
        out.append(f"generate.max_new_tokens={cfg.generate.max_new_tokens} exceeds model.context_length={ctx}")
    if ctx is not None and cfg.eval.max_new_tokens > ctx:
        out.append(f"eval.max_new_tokens={cfg.eval.max_new_tokens} exceeds model.context_length={ctx}")
    return out


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check every group and every combination; raise one ConfigError that lists all problems."""
    if cfg.merge.base == "auto":  # the merge that reproduces what was trained (issue 18: parity 100% vs 97-98%)
        cfg.merge.base = "nf4_roundtrip" if cfg.quant.is_4bit else "original"
    # First, and alone: the range checks below compare and convert numbers, and int(inf) raises OverflowError.
    non_finite = non_finite_problems(cfg)
    if non_finite:
        raise ConfigError(non_finite)
    problems: list[str] = []
    for group in (cfg.model, cfg.quant, cfg.peft, cfg.data, cfg.train, cfg.eval, cfg.merge, cfg.generate,
                  cfg.export, cfg.verify):
        problems.extend(group.problems())
    problems.extend(cross_field_problems(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg
