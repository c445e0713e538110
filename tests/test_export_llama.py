"""GGUF export of the Llama architecture (SmolLM2's): tensor map, q/k rotary permutation, tied head, GPT-2/SmolLM
pre-tokenizers, `<|im_end|>` as end of turn, and a Modelfile with SmolLM2's default system prompt (issue 13, item 3).

The model is the small random Llama of tests/llama_support.py trained until it answers four chats word for word
(`memorized_model`, as for Qwen2 in test_export_gguf.py), so an exact greedy match means the weights, the rotary
layout and the tokenizer all arrived. Readers: the gguf package (always), transformers' GGUF loader (always; it
undoes llama.cpp's q/k permutation on load, so a missing or wrong permutation changes its outputs) and llama.cpp
itself (marker `llamacpp`, `make test-llamacpp`).
"""
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import FinetuneError
from finetune.export.gguf import check_tokenizer, plan_gguf, rope_pairs
from finetune.export.llamacpp import open_gguf
from finetune.export.run import export_gguf
from finetune.export.verify import llama_cpp_available
from finetune.generate.generation import stop_token_ids
from tests.llama_support import DEFAULT_SYSTEM, build_tiny_llama, llama_dir, tokenizer_kind  # noqa: F401 (fixture)
from tests.test_export_gguf import CHATS, PROMPTS, _prompt_ids, export_cfg, greedy, memorized_model
from tests.test_merge_weights import compose_config



def needs_llama_cpp(test):
    """Marker `llamacpp` (deselected by default) and a skip naming the install when llama-cpp-python is absent."""
    skip = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed: "
                              "run `make test-llamacpp`")
    return pytest.mark.llamacpp(skip(test))



# Text where tokenizers disagree when their splits differ: runs of spaces before digits, digits in words, unicode.
TOKENIZER_PROBES = ['{\n    "a": 1,\n    "b": [\n        12,\n        345\n    ]\n}', "x  1  22   333\n\n 4444 2026",
                    "Ünïcode 日本語 it's  don't\t\ttab", "<|im_start|>user\nHi<|im_end|>\n"]


def make_llama_run(root, base):
    from omegaconf import OmegaConf

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(), resolve=True))
    memorized_model(base, root / "merged", max_steps=400)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": p}) + "\n" for p in PROMPTS))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir):
    return make_llama_run(tmp_path_factory.mktemp("llama-exp") / "run", llama_dir)


@pytest.fixture(scope="module")
def f16(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-f16") / "out"
    return export_gguf(export_cfg(run, f"export.output={out}", "export.verify=transformers",
                                  f"export.prompts={run}/prompts.jsonl"), run)


def gguf_file(out):
    return next(out.glob("*.gguf"))  # <config name>-<quant>.gguf


def field(reader, key):
    return reader.fields[key].contents()


def test_llama_metadata_tokenizer_and_tied_head(run, f16):
    r = gguf.GGUFReader(gguf_file(f16))
    config = json.loads((run / "merged" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.block_count") == 2 and field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 2 and field(r, "llama.rope.dimension_count") == 16
    assert field(r, "llama.rope.freq_base") == config["rope_parameters"]["rope_theta"] == 1e5
    assert field(r, "llama.vocab_size") == config["vocab_size"] == len(field(r, "tokenizer.ggml.tokens"))
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert field(r, "tokenizer.ggml.bos_token_id") == 1 and field(r, "tokenizer.ggml.add_bos_token") is False
    types = field(r, "tokenizer.ggml.token_type")
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3
    assert field(r, "tokenizer.chat_template") == tok.chat_template and DEFAULT_SYSTEM in tok.chat_template
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "blk.1.ffn_gate.weight" in names and len(names) == 2 + 2 * 9


def test_q_and_k_rows_are_stored_in_llama_cpps_rotary_order(run, f16):
    """The GGUF's q/k are the HF rows permuted (over 4 query heads, 2 key-value heads); v and o are untouched."""
    from safetensors.torch import load_file

    hf = {k: v.float().numpy() for k, v in load_file(run / "merged" / "model.safetensors").items()}
    stored = {t.name: np.asarray(t.data, dtype=np.float32).reshape(t.shape[::-1].tolist())
              for t in gguf.GGUFReader(gguf_file(f16)).tensors}
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_allclose(stored["blk.0.attn_q.weight"], rope_pairs(hf[q], 4), atol=1e-3)
    np.testing.assert_allclose(stored["blk.0.attn_k.weight"], rope_pairs(hf[k], 2), atol=1e-3)
    assert not np.allclose(stored["blk.0.attn_q.weight"], hf[q], atol=1e-3)
    np.testing.assert_allclose(stored["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"], atol=1e-3)


def test_rope_pairs_turns_rotate_half_into_adjacent_pair_rotation():
    """Why the permutation is right: HF's rotary (pairs i, i+d/2) on the original rows equals llama.cpp's
    (pairs 2i, 2i+1) on the permuted rows, up to the same permutation of the output."""
    torch.manual_seed(0)
    n_head, d, width = 3, 8, 5
    w, x = torch.randn(n_head * d, width), torch.randn(width)
    angle = 0.7 * 10000.0 ** (-torch.arange(d // 2) / (d // 2))
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rotate_half(v):  # transformers' LlamaRotaryEmbedding, per head
        a, b = v[: d // 2], v[d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def rotate_pairs(v):  # ggml_rope mode 0 (LLAMA_ROPE_TYPE_NORM), per head
        a, b = v[0::2], v[1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(d)

    hf = torch.cat([rotate_half(h) for h in (w @ x).split(d)])
    permuted = torch.from_numpy(rope_pairs(w.numpy(), n_head))
    ours = torch.cat([rotate_pairs(h) for h in (permuted @ x).split(d)])
    torch.testing.assert_close(ours, torch.from_numpy(rope_pairs(hf[:, None].numpy(), n_head))[:, 0])
    # attention scores are dot products per head: the shared permutation cancels
    torch.testing.assert_close(ours.view(n_head, d).norm(dim=1), hf.view(n_head, d).norm(dim=1))


def test_transformers_gguf_loader_reproduces_the_merged_llama(run, f16):
    v = json.loads((f16 / "export.json").read_text())["verification"]
    assert v["reader"] == "transformers" and v["tokenizer_identical"] and v["chat_template_identical"]
    assert v["identical_greedy_outputs"] == 4 and v["ok"], v
    assert v["max_abs_logit_diff"] < 5e-3 * v["max_abs_logit"]  # f16 rounding, not another model


def test_modelfile_carries_smollm2s_default_system_prompt_and_stop(f16):
    text = (f16 / "Modelfile").read_text()
    assert f'SYSTEM """{DEFAULT_SYSTEM}"""' in text and 'TEMPLATE """' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    info = json.loads((f16 / "export.json").read_text())["modelfile"]
    assert info["system"] == DEFAULT_SYSTEM and info["stop"] == ["<|im_end|>"]


def test_smollm_digit_split_maps_to_llama_cpps_smollm(tmp_path):
    folder = build_tiny_llama(tmp_path / "digits", digits=True)
    assert tokenizer_kind(folder) == ["Digits", "ByteLevel"] and check_tokenizer(folder)[1] == "smollm"


@pytest.mark.parametrize("edit,message", [
    (lambda pre: {**pre, "add_prefix_space": True}, "add_prefix_space=true"),
    (lambda pre: {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, pre]},
     "step 'Digits'"),
    (lambda pre: {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}]}, "step 'Whitespace'"),
])
def test_gpt2_variants_llama_cpp_has_no_name_for_are_refused(llama_dir, tmp_path, edit, message):
    folder = tmp_path / "tok"
    shutil.copytree(llama_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = edit(spec["pre_tokenizer"])
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(FinetuneError, match=f"{message}.*no llama.cpp equivalent.*qwen2, gpt-2, smollm.*nothing was"):
        check_tokenizer(folder)


def test_llama_biases_are_planned_and_rope_scaling_is_refused(llama_dir, tmp_path):
    biased = build_tiny_llama(tmp_path / "b", attention_bias=True, mlp_bias=True)
    planned = {t.name: t.rope_heads for t in plan_gguf(biased, "f16").tensors}
    assert planned["blk.0.attn_q.bias"] == 4 and planned["blk.0.attn_k.bias"] == 2
    assert planned["blk.0.attn_output.bias"] == 0 and "blk.1.ffn_down.bias" in planned
    scaled = tmp_path / "s"
    shutil.copytree(llama_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(FinetuneError, match="rope scaling 'llama3'.*nothing was written"):
        plan_gguf(scaled, "f16")


# --- llama.cpp itself -------------------------------------------------------------------------------------------

def llama_greedy(llm, prompt, stops, n=24):
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if tok in stops or len(out) == n:
            break
        out.append(tok)
    return out


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_generates_what_transformers_generates(run, tmp_path, quant):
    out = export_gguf(export_cfg(run, f"export.quant={quant}", f"export.output={tmp_path}/{quant}",
                                 "export.verify=llama_cpp", f"export.prompts={run}/prompts.jsonl"), run)
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["reader"] == "llama_cpp" and v["tokenizer_identical"] and v["chat_template_identical"]
    assert v["identical_greedy_outputs"] == v["prompts"] == 4 and v["ok"], v

    tok = AutoTokenizer.from_pretrained(run / "merged")
    ref = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    llm = open_gguf(gguf_file(out), n_ctx=256, n_threads=2, verbose=False)
    assert llm.metadata["general.architecture"] == "llama" and llm.n_vocab() == ref.config.vocab_size
    assert llm.token_eos() == 2 and llm.token_bos() == 1
    prompts = [_prompt_ids(tok, p) for p in PROMPTS]
    expected = greedy(ref, tok, PROMPTS)
    assert [tok.decode(e) for e in expected] == [c[-1]["content"] for c in CHATS]
    assert [llama_greedy(llm, ids, stop_token_ids(tok, ref)) for ids in prompts] == expected


@needs_llama_cpp
@pytest.mark.parametrize("digits", [False, True], ids=["gpt-2", "smollm"])
def test_llama_cpp_tokenizes_like_transformers(run, llama_dir, tmp_path, digits):
    folder = build_tiny_llama(tmp_path / "m", digits=digits) if digits else llama_dir
    out = export_gguf(export_cfg(run, f"export.model={folder}", f"export.output={tmp_path}/o", "export.verify=none"),
                      None)
    tok = AutoTokenizer.from_pretrained(folder)
    llm = open_gguf(gguf_file(out), n_ctx=256, n_threads=1, verbose=False, vocab_only=True)
    for text in TOKENIZER_PROBES:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    assert llm.metadata["tokenizer.ggml.pre"] == ("smollm" if digits else "gpt-2")


@needs_llama_cpp
def test_llama_cpp_stops_at_im_end_by_itself_and_renders_chatml(run, f16):
    from finetune.export.verify import PROBE, LlamaCppReader

    tok = AutoTokenizer.from_pretrained(run / "merged")
    reader = LlamaCppReader(gguf_file(f16), n_ctx=256)
    assert reader.render(PROBE) == tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    # Known llama.cpp behaviour, kept visible here: its built-in ChatML formatter (llama_chat_apply_template, used
    # without --jinja) does not run the stored Jinja, so a chat without a system message gets no default system
    # turn. The GGUF still stores the template (llama-server --jinja renders it) and the Modelfile has SYSTEM.
    chat = PROMPTS[0]
    default_turn = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert want.startswith(default_turn) and reader.render(chat) == want[len(default_turn):]
    llm = open_gguf(gguf_file(f16), n_ctx=256, n_threads=2, verbose=False)
    text = tok.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    res = llm.create_completion(text, max_tokens=24, temperature=0.0, top_k=1)
    assert res["choices"][0]["text"] == "Blue." and res["choices"][0]["finish_reason"] == "stop"
