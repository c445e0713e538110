"""verify/: owns the cross-engine parity report (`finetune verify run=<run>` -> <run>/verify/report.json + report.md).

The same held-out prompts go, greedy, through every engine people deploy a run on; each is compared with the
merged folder in transformers (the artifact that ships):

    report.py        pure comparison: identical outputs, token agreement, first divergence, template / stop check
    hf.py            the adapter on its training base (transformers + peft) and the merged folder (the reference)
    llamacpp.py      the GGUF export in llama.cpp (llama-cpp-python)
    vllm_engine.py   vLLM serving the merged folder and the base + LoRA adapter, run in its own virtual environment
    vllm_worker.py   the script that venv's python runs (imports vllm and the standard library only)
    run.py           wiring: prompts, engines, report files, the pass/fail decision

This is the last stage before pipeline/cli: it may import every stage above it.
"""
