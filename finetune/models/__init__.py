"""Models: base model and tokenizer loading (device, dtype, bitsandbytes quantization, peft's k-bit
preparation), target-module checks, LoRA adapters loaded back onto a base, and the embedded offline models
(the random tiny Qwen2 for tests). May import: errors, paths, files, distributed, config.
"""
