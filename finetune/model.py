"""Loading the base model and tokenizer: device, compute dtype, quantization."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.schema import ModelConfig, PeftConfig, QuantConfig

log = logging.getLogger("finetune.model")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device=cuda but no CUDA GPU is visible; use device=cpu (or auto)")
    return device


def resolve_dtype(name: str, device: str):
    """'auto' -> bf16 on CUDA, fp32 on CPU (bf16 is 2-3x slower on CPUs without native bf16)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_path(cfg: ModelConfig) -> str:
    """Folder or Hub id to load; the embedded tiny model is built (once) on demand."""
    if cfg.is_embedded:
        from finetune.tiny import tiny_model_dir

        return str(tiny_model_dir())
    return cfg.name_or_path


def _hub_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    # No code from a model repo runs unless the user set trust_remote_code explicitly.
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """Tokenizer with a chat template and a pad token (needed for batching)."""
    from transformers import AutoTokenizer

    path = path or model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(cfg))
    except OSError as e:
        raise FinetuneError(f"model.name_or_path={cfg.name_or_path!r}: cannot load a tokenizer ({e})") from None
    if cfg.chat_template:
        p = Path(cfg.chat_template)
        tok.chat_template = p.read_text(encoding="utf-8") if p.suffix == ".jinja" and p.is_file() else cfg.chat_template
    if not tok.chat_template:
        raise FinetuneError(
            f"model.name_or_path={cfg.name_or_path!r} has no chat template; set model.chat_template "
            "to a Jinja template (text or a .jinja file)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quant: QuantConfig, compute_dtype):
    """bitsandbytes config for the quant group, or None for a plain 16-bit/fp32 base."""
    if not quant.is_quantized:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quant.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # uint8 unless set: FSDP needs a float storage dtype (quant=nf4_fsdp) to shard 4-bit weights.
        bnb_4bit_quant_storage=getattr(torch, quant.storage_dtype or "uint8"),
    )


def load_base_model(model_cfg: ModelConfig, quant: QuantConfig, device: str, *, quantize: bool = True):
    """Load the base causal LM on `device`, quantized as the quant group says (unless quantize=False).

    With quantize=False the base loads unquantized in the compute dtype: that is what merging into
    the 'original' base and the base-vs-tuned comparison need.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(quant.compute_dtype, device)
    qcfg = quantization_config(quant, dtype) if quantize else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path(model_cfg),
            dtype=dtype,
            quantization_config=qcfg,
            device_map=device,
            attn_implementation=model_cfg.attn_implementation,
            **_hub_kwargs(model_cfg),
        )
    except OSError as e:
        raise FinetuneError(f"model.name_or_path={model_cfg.name_or_path!r}: cannot load the model ({e})") from None
    log.info("loaded %s (%s, %s) on %s", model_cfg.name_or_path, quant.method if qcfg else "unquantized", dtype, device)
    return model


def load_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """Architecture numbers for the memory plan: `model.architecture`, else the model's config.json.

    Only config.json is read (a few KB), never the weights, so the plan works for a Hub model that is not
    downloaded; offline, the shipped model configs carry the numbers.

    Raises:
        FinetuneError: neither source is available.
    """
    if cfg.architecture:
        return dict(cfg.architecture)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path(cfg), **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise FinetuneError(
            f"model.name_or_path={cfg.name_or_path!r}: no model.architecture in the config and config.json cannot "
            f"be read ({str(e).splitlines()[0]}); add the numbers (hidden_size, num_hidden_layers, ...) to "
            "model.architecture"
        ) from None
    return config.get_text_config().to_dict()


def module_names(model) -> tuple[list[str], list[str]]:
    """(linear layer names, all module names) of `model`, as the last component peft matches against.

    bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so quantized layers count as linear.
    """
    import torch

    linear, every = set(), set()
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not leaf.isdigit():  # "layers.0" is a container index, not a name anyone targets
            every.add(leaf)
        if isinstance(module, torch.nn.Linear):
            linear.add(leaf)
    return sorted(linear), sorted(every)


def target_module_problems(model, peft: PeftConfig, model_name: str) -> list[str]:
    """Names in peft.target_modules / peft.modules_to_save that `model` does not have, each naming the key and
    the modules it does have. peft matches a name against the end of each module path (`q_proj` hits
    `model.layers.0.self_attn.q_proj`); its own error names neither the key nor the alternatives."""
    linear, every = module_names(model)
    problems = []
    if peft.target_modules != "all-linear":
        for name in peft.target_modules:
            if name.rsplit(".", 1)[-1] not in linear:
                problems.append(f"peft.target_modules: {name!r} is not a linear layer of {model_name}; "
                                f"its linear layers are: {', '.join(linear)}")
    for name in peft.modules_to_save or ():
        if name.rsplit(".", 1)[-1] not in every:
            problems.append(f"peft.modules_to_save: {name!r} is not a module of {model_name}; "
                            f"its modules are: {', '.join(every)}")
    return problems


def check_target_modules(model, peft: PeftConfig, model_name: str) -> None:
    """Raise ConfigError listing every `target_module_problems`."""
    from finetune.errors import ConfigError

    problems = target_module_problems(model, peft, model_name)
    if problems:
        raise ConfigError(problems)


def target_module_problems_from_config(cfg: ModelConfig, peft: PeftConfig) -> list[str]:
    """`target_module_problems` on a weightless copy of the model built from its config.json, so a wrong
    module name fails in seconds instead of after loading gigabytes. Empty when config.json cannot be read
    (e.g. offline with a Hub model that is not cached): the check after loading still runs."""
    if peft.target_modules == "all-linear" and not peft.modules_to_save:
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path(cfg), **_hub_kwargs(cfg))
    except (OSError, ValueError):
        return []
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return target_module_problems(skeleton, peft, cfg.name_or_path)
