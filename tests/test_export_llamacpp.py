"""The exported GGUF file read by llama.cpp itself (llama-cpp-python): greedy output equals transformers' (issue 9, item 3).

llama-cpp-python is served by PyPI as source only and compiles llama.cpp on install (measured here: see README),
so these tests carry the `llamacpp` marker and skip only when `llama_cpp` cannot be imported. Run them with
`make test-llamacpp` (installs the `llamacpp` extra, then `pytest -m llamacpp`).
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.export.llamacpp import open_gguf
from finetune.export.run import export_gguf
from finetune.generate.generation import stop_token_ids
from tests.test_export_gguf import PROMPTS, _prompt_ids, export_cfg, greedy, make_run

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-llamacpp`")
pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    return make_run(tmp_path_factory.mktemp("llamacpp") / "run", tiny_dir)


def llama_greedy(llm, prompt, stops, n=24):
    """Greedy decoding by llama.cpp's own sampler (temperature 0), until a stop token."""
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if tok in stops or len(out) == n:
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_generates_what_transformers_generates(run, tmp_path, quant):
    out = export_gguf(export_cfg(run, f"export.quant={quant}", f"export.output={tmp_path}/{quant}",
                                 "export.verify=llama_cpp", f"export.prompts={run}/prompts.jsonl"), run)
    report = json.loads((out / "export.json").read_text())["verification"]
    assert report["reader"] == "llama_cpp" and report["identical_greedy_outputs"] == report["prompts"] == 4
    assert report["tokenizer_identical"] and report["chat_template_identical"] and report["ok"]

    # The same comparison written out here, against the file as llama.cpp loads it.
    merged = run / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    ref_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    llm = open_gguf(out / f"demo-{quant}.gguf", n_ctx=256, n_threads=2, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.metadata["general.architecture"] == "qwen2" and llm.n_vocab() == ref_model.config.vocab_size
    prompts = [_prompt_ids(tok, p) for p in PROMPTS]
    for conv, ids in zip(PROMPTS, prompts):  # llama.cpp's tokenizer, special tokens parsed, no BOS added
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == tok.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(tok, ref_model)
    expected = greedy(ref_model, tok, PROMPTS)
    assert [tok.decode(e) for e in expected] == ['{"name": "Ada"}', "Blue.", '{"name": "Ada", "age": 36, "city": "London"}',
                                                 "1, 2, 3, 4, 5"]
    assert [llama_greedy(llm, ids, stops) for ids in prompts] == expected


def test_llama_cpp_renders_the_chat_template_like_transformers(run, tmp_path):
    out = export_gguf(export_cfg(run, f"export.output={tmp_path}/o", "export.verify=none"), run)
    from finetune.export.verify import PROBE, LlamaCppReader

    tok = AutoTokenizer.from_pretrained(run / "merged")
    reader = LlamaCppReader(out / "demo-f16.gguf", n_ctx=128)
    assert reader.render(PROBE) == tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)


def test_llama_cpp_ends_the_reply_at_im_end_by_itself(run, tmp_path):
    """Without our stop list: llama.cpp's own end-of-generation set (what llama-server and Ollama stop on)."""
    out = export_gguf(export_cfg(run, f"export.output={tmp_path}/o", "export.verify=none"), run)
    llm = open_gguf(out / "demo-f16.gguf", n_ctx=256, n_threads=2, verbose=False)
    tok = AutoTokenizer.from_pretrained(run / "merged")
    text = tok.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    res = llm.create_completion(text, max_tokens=24, temperature=0.0, top_k=1)
    assert res["choices"][0]["text"] == "Blue." and res["choices"][0]["finish_reason"] == "stop"


def test_k_quant_through_llama_cpps_quantizer(run, tmp_path):
    out = export_gguf(export_cfg(run, "export.quant=q4_k_m", f"export.output={tmp_path}/k", "export.verify=llama_cpp",
                                 f"export.prompts={run}/prompts.jsonl"), run)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "demo-q4_k_m.gguf", "export.json"]  # no f16 left
    report = json.loads((out / "export.json").read_text())
    llm = open_gguf(out / "demo-q4_k_m.gguf", n_ctx=64, verbose=False)
    assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # 128-wide rows do not split into 256-value k-blocks: llama.cpp falls back to q5_0/q8_0 for those
    assert set(report["tensor_types"]) <= {"F32", "Q4_K", "Q6_K", "Q5_0", "Q8_0"} and "F16" not in report["tensor_types"]
    v = report["verification"]
    assert v["reader"] == "llama_cpp" and v["tokenizer_identical"] and v["identical_greedy_outputs"] == 4


def test_repacked_weight_buffers_are_off_only_on_amx_cpus(monkeypatch):
    """llama.cpp's AMX-repacked buffers crash decoding of quantized files (finetune/export/llamacpp.py)."""
    from finetune.export import llamacpp as mod

    assert mod.extra_buffers_crash({"avx2", "amx_int8", "amx_tile"})
    assert not mod.extra_buffers_crash({"avx2", "avx512f", "avx512_bf16"})
    seen = []

    class Recorder:
        def __init__(self, **kwargs):
            seen.append(llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts)

    monkeypatch.setattr(llama_cpp, "Llama", Recorder)
    for crash in (True, False):
        monkeypatch.setattr(mod, "extra_buffers_crash", lambda crash=crash: crash)
        mod.open_gguf("unused.gguf")
    assert seen == [False, True]
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the default is restored
