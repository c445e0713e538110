"""finetune: Hydra-config-driven LoRA/QLoRA fine-tuning of instruction-tuned causal LMs.

One package per stage, in the order data flows through a run. A module may import from its own package
and from the packages above it in this list, never from one below (tests/test_layout.py checks every
import, including those inside functions):

    errors, paths, files, distributed   shared ground: error types, where things live, atomic writes, ranks
    config/       the typed schema Hydra composes onto; validation of values and combinations
    data/         sources -> formats -> conversations -> chat-template rendering -> ids + loss masks
    models/       base model and tokenizer loading, k-bit preparation, adapters, embedded models
    generate/     batched / constrained generation used by every later stage and by `finetune generate`
    train/        the trl SFTTrainer run: checkpoints, callbacks, memory plan, plots
    merge/        adapter + base -> merged shards, parity report, model card
    evaluation/   held-out generation, metrics, gates, report, lm-eval bridge
    export/       GGUF + Ollama Modelfile, read back and verified
    pipeline, cli the whole run wired together; the console entry point
"""

__version__ = "0.1.0"
