"""finetune: Hydra-config-driven LoRA/QLoRA fine-tuning of instruction-tuned causal LMs."""

__version__ = "0.1.0"
