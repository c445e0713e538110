"""Loading the base model and tokenizer: device, compute dtype, quantization."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.config import ModelConfig, PeftConfig, QuantConfig

log = logging.getLogger("finetune.models.load")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device=cuda but no CUDA GPU is visible; use device=cpu (or auto)")
    return device


def resolve_dtype(name: str, device: str):
    """'auto' -> bf16 on CUDA; on CPU bf16 only where the CPU has native bf16 and a measured bf16 matmul is
    faster by a margin, else fp32 (finetune.models.cpu; FINETUNE_CPU_DTYPE=float32|bfloat16 overrides)."""
    import torch

    if name == "auto":
        if device == "cpu":
            from finetune.models.cpu import cpu_compute_dtype

            return cpu_compute_dtype()
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_path(cfg: ModelConfig) -> str:
    """Folder or Hub id to load; embedded models and `model.gguf_file` are built (once) on demand."""
    if cfg.gguf_file:
        from finetune.models.gguf import convert_gguf

        if not Path(cfg.gguf_file).expanduser().is_file():
            raise FinetuneError(f"model.gguf_file={cfg.gguf_file!r}: no such file; give the path of a local .gguf")
        return str(convert_gguf(Path(cfg.gguf_file).expanduser()))
    if cfg.name_or_path == "embedded:smollm2-135m-instruct":
        from finetune.models.gguf import smollm2_model_dir

        return str(smollm2_model_dir())
    if cfg.is_embedded:
        from finetune.models.tiny import tiny_model_dir

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
    the 'original' base and the base-vs-tuned comparison need. A quantized base comes back prepared for
    k-bit training (`prepare_quantized_base`), the form the adapter trains against, wherever it is loaded
    (training, the parity report, the nf4-roundtrip merge).
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(quant.compute_dtype, device)
    qcfg = quantization_config(quant, dtype) if quantize else None
    if model_cfg.attn_implementation == "sdpa_packed":
        from finetune.models import attention

        attention.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path(model_cfg),
            # A quantized base reads its tensors in the checkpoint's own dtype ("auto"), not the compute dtype:
            # loading Qwen2.5-0.5B's bf16 checkpoint as fp32 for CPU compute doubled the non-quantized tensors and
            # the load peak (benchmarks/memory.py: 756 -> 238 MB above imports). bitsandbytes quantizes from
            # those values and computes in quant.compute_dtype either way.
            dtype="auto" if qcfg else dtype,
            quantization_config=qcfg,
            device_map=device,
            attn_implementation=model_cfg.attn_implementation,
            **_hub_kwargs(model_cfg),
        )
    except OSError as e:
        raise FinetuneError(f"model.name_or_path={model_cfg.name_or_path!r}: cannot load the model ({e})") from None
    if qcfg:
        prepare_quantized_base(model, compute_dtype=None if quant.fp32_norms else dtype)
    log.info("loaded %s (%s, %s) on %s", model_cfg.name_or_path, quant.method if qcfg else "unquantized", dtype, device)
    return model


def prepare_quantized_base(model, *, compute_dtype=None, keep_embeddings_16bit: bool | None = None) -> None:
    """peft's `prepare_model_for_kbit_training` (without checkpointing, which the Trainer configures) with two
    deviations: frozen 16-bit embeddings stay 16-bit, and with a 16-bit `compute_dtype` the norms and biases
    stay in it too.

    peft freezes the base and casts every non-quantized 16-bit tensor to fp32, for stable norms. For the
    embedding table that buys nothing: its values come from a 16-bit checkpoint, and widening them is exact,
    so we keep the table as stored and cast only what it returns (a forward hook), and the output head --
    the same tensor when tied, as in Qwen2.5 -- computes in the input's dtype (trl's fused loss head already
    widens each vocabulary tile it reads). The table costs half: Qwen2.5-0.5B 272 MB instead of 545, Qwen2.5-3B
    0.62 GB instead of 1.24.

    `compute_dtype` None or fp32: norms and biases become fp32 as in peft, and outputs are bitwise those of
    peft's version. A 16-bit `compute_dtype` (quant.fp32_norms=false, the default) keeps norms, biases and the
    embedding output in it, so the residual stream between layers is 16-bit as in 16-bit LoRA: fp32 norms
    turn every norm's output, and with it each layer's sum, back into fp32, and autograd keeps those fp32
    activations (Qwen2.5-0.5B shape, bf16 compute, 2,048 tokens: 6,941 -> 5,572 MB peak; benchmarks/memory.py).
    Under FSDP or DeepSpeed (`keep_embeddings_16bit` None) peft's all-fp32 layout is kept: their flat
    parameter groups want one dtype per wrapped unit.
    """
    import torch

    from finetune.distributed import launch_info

    sharded = launch_info().engine in ("fsdp", "deepspeed")
    if keep_embeddings_16bit is None:
        keep_embeddings_16bit = not sharded
    sixteen = (torch.float16, torch.bfloat16)
    residual = compute_dtype if compute_dtype in sixteen and not sharded else torch.float32
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    kept = {id(m.weight) for m in (emb, head) if m is not None} if keep_embeddings_16bit else set()
    for p in model.parameters():
        p.requires_grad = False
        # Params4bit stored as bf16 (quant.storage_dtype, for FSDP) are packed 4-bit codes: never cast them
        if p.is_floating_point() and p.dtype != residual and type(p).__name__ != "Params4bit" and id(p) not in kept \
                and (p.dtype in sixteen or residual in sixteen):
            p.data = p.data.to(residual)
    _keep_training_layout(model)
    if emb.weight.dtype != residual:
        emb.register_forward_hook(_OutputCast(residual))
        if emb.weight.dtype in sixteen:
            log.info("frozen embeddings kept in %s (peft would widen them to fp32)", emb.weight.dtype)
    if residual in sixteen:
        log.info("norms, biases and the residual stream in %s (quant.fp32_norms=false)", residual)
    if head is not None and (head.weight.dtype in sixteen or head.weight.dtype != residual) \
            and type(head) is torch.nn.Linear:
        head.forward = _WidenedLinear(head)


def _keep_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference. On CPUs with AVX512-BF16, the first
    eval-mode forward without gradients (the Trainer's eval loss, a parity check) converts each Linear4bit to a
    gemv layout for good, and the next training step then fails inside bitsandbytes ("a view of a leaf Variable
    that requires grad is being used in an in-place operation"). Keeping one layout also means eval-time
    forwards compute with the same kernels as training did."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class _OutputCast:
    """Embedding forward hook: the table's rows in the residual stream's dtype (fp32: as peft's fp32 table
    would have returned them). An object, not a closure, so that a deep copy of the module keeps working."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, module, args, output):
        return output.to(self.dtype) if output.dtype != self.dtype else output


class _WidenedLinear:
    """forward of a frozen output head fed hidden states of another dtype: cast the weight for the product (with
    fp32 compute this widens a 16-bit head instead of narrowing the input, so the logits equal those of peft's
    fp32 head; an fp32 head of a 16-bit residual stream is narrowed). Under autocast the
    product runs in the autocast dtype as before. An object holding the module rather than a closure over it, so
    that a deep copy (peft's modules_to_save copies the head) computes with the copy's own weight."""

    def __init__(self, linear):
        self.linear = linear

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        w, b = self.linear.weight, self.linear.bias
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            b = b.to(x.dtype) if b is not None else None
        return F.linear(x, w, b)


def load_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """Architecture numbers of the model being trained, for the memory plan and the preflight checks.

    The model's own config.json comes first (a few KB; never the weights). `model.architecture` is used
    when you set it yourself (architecture_of null), or when config.json cannot be read and the numbers
    belong to this very model: a preset (model=qwen2_5_3b_instruct) carries its model card's numbers for
    offline planning, tagged with architecture_of, and they never describe another model.

    Raises:
        FinetuneError: no numbers for this model can be found.
    """
    own = cfg.architecture if cfg.architecture and cfg.architecture_of in (None, cfg.name_or_path) else None
    if own and cfg.architecture_of is None:
        return dict(own)  # numbers the user set: theirs to plan with
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path(cfg), **_hub_kwargs(cfg))
    except (OSError, ValueError) as e:
        if own:
            return dict(own)
        raise FinetuneError(
            f"model.name_or_path={cfg.name_or_path!r}: config.json cannot be read ({str(e).splitlines()[0]}) and "
            "model.architecture has no numbers for this model; download the model, or set model.architecture "
            "(hidden_size, num_hidden_layers, ...) and model.architecture_of=null"
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


def logits_not_plain(model) -> str | None:
    """Why the model's logits are more than its output embeddings applied to the decoder's last hidden state
    (None when they are not): logit soft-capping or scaling, or router logits whose auxiliary loss joins the
    loss. Code that projects hidden states itself (train/loss_head.py, generate(score=...)) checks this."""
    text = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) not in (None, 1, 1.0):
            return f"the model's config sets {name}"
    if getattr(text, "output_router_logits", False):
        return "the model has router logits (MoE auxiliary loss)"
    return None
