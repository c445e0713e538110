"""`finetune export`: a GGUF file of the merged model with tokenizer and chat template, read back (issue 9).

The merged model is the embedded tiny model fine-tuned in a few seconds until it answers four chats
word for word (`memorized_model`): like a fine-tuned model on its task, its greedy replies are varied text
chosen by clear margins, so "identical greedy output" means something (the untrained tiny model only
repeats a newline; a randomly re-initialised one is so chaotic that q8_0 rounding flips its tokens).
A real `finetune train` run is exported in the slow test. The second reader in this file is transformers'
own GGUF loader; llama.cpp itself is in test_export_llamacpp.py.
"""
import json
import shutil

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import run_cli
from finetune.errors import FinetuneError
from finetune.export.run import export_gguf
from finetune.generate.generation import generate
from tests.test_merge_weights import compose_config

CHATS = [
    [{"role": "user", "content": "Give me a JSON object with a name."}, {"role": "assistant", "content": '{"name": "Ada"}'}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Ada is 36 and lives in London."},
     {"role": "assistant", "content": '{"name": "Ada", "age": 36, "city": "London"}'}],
    [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
     {"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "1, 2, 3, 4, 5"}],
]
PROMPTS = [c[:-1] for c in CHATS]


def _prompt_ids(tok, conv):
    return tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def memorized_model(tiny_dir, out, max_steps=200):
    """The tiny model trained (all weights, fp32) on CHATS' last replies until it reproduces them; saved to `out`."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    rows = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"] for c in CHATS]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (row, conv) in enumerate(zip(rows, CHATS)):
        start = len(_prompt_ids(tok, conv[:-1]))
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        labels[i, start:len(row)] = torch.tensor(row[start:])  # the reply and its <|im_end|>
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(max_steps):  # about 50 steps
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    model.eval()
    got = greedy(model, tok, PROMPTS)
    assert [tok.decode(g) for g in got] == [c[-1]["content"] for c in CHATS], "the fixture model did not learn"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(tiny_dir / "generation_config.json", out)
    return out


def greedy(model, tok, convs, n=24):
    return [g.token_ids for g in generate(model, tok, [_prompt_ids(tok, c) for c in convs], max_new_tokens=n)]


def make_run(root, tiny_dir):
    """A run directory as `finetune train` leaves it, as far as export reads it: config.yaml + merged/;
    plus prompts.jsonl (the chats' prompts) for the verification."""
    from omegaconf import OmegaConf

    root.mkdir(parents=True)
    # name=demo: the run name the files are called after (the default is now the model's slug, "tiny")
    (root / "config.yaml").write_text(OmegaConf.to_yaml(compose_config("name=demo"), resolve=True))
    memorized_model(tiny_dir, root / "merged")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": p}) + "\n" for p in PROMPTS))
    return root


def export_cfg(run, *overrides):
    from finetune.cli import setup

    return setup(compose_config(f"run={run}", *overrides), from_run=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    return make_run(tmp_path_factory.mktemp("exp") / "run", tiny_dir)


@pytest.fixture(scope="module")
def f16_cli(run):
    res = run_cli("export", f"run={run}", "export.verify=transformers", f"export.prompts={run}/prompts.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def field(reader, key):
    return reader.fields[key].contents()


def test_export_command_writes_gguf_modelfile_and_report(run, f16_cli):
    out = run / "export" / "gguf-f16"
    assert f16_cli["export"] == str(out / "demo-f16.gguf") and f16_cli["quant"] == "f16"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "demo-f16.gguf", "export.json"]
    assert f16_cli["bytes"] == (out / "demo-f16.gguf").stat().st_size
    assert f16_cli["reader"] == "transformers" and f16_cli["ok"] and f16_cli["identical_greedy_outputs"] == 4
    assert not list((run / "export").glob(".gguf-f16.*"))  # no temporary folder left


def test_gguf_metadata_carries_architecture_tokenizer_and_chat_template(run, f16_cli):
    r = gguf.GGUFReader(run / "export" / "gguf-f16" / "demo-f16.gguf")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    config = json.loads((run / "merged" / "config.json").read_text())
    assert field(r, "general.architecture") == "qwen2" and field(r, "general.name") == "demo"
    assert field(r, "qwen2.block_count") == config["num_hidden_layers"]
    assert field(r, "qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(r, "qwen2.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == config["vocab_size"]  # one entry per embedding row, unused rows padded
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        i = tok.convert_tokens_to_ids(text)
        assert tokens[i] == text and types[i] == gguf.TokenType.CONTROL
    assert tokens[len(tok)] == f"[PAD{len(tok)}]" and types[len(tok)] == gguf.TokenType.UNUSED
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert field(r, "tokenizer.ggml.add_bos_token") is False  # Qwen adds no BOS; llama.cpp must not either
    assert len(field(r, "tokenizer.ggml.merges")) > 100
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_q.bias"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in kinds  # tied embeddings: llama.cpp reuses token_embd


def test_modelfile_has_template_and_stop_tokens(run, f16_cli):
    text = (run / "export" / "gguf-f16" / "Modelfile").read_text()
    assert "FROM ./demo-f16.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert 'TEMPLATE """' in text and '{{ "<|im_start|>assistant\\n" }}' in text
    assert "PARAMETER temperature 0" in text  # generation_config says greedy


@pytest.mark.parametrize("quant,rel_tol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_transformers_gguf_loader_reproduces_the_merged_model(run, tmp_path, quant, rel_tol):
    out = export_gguf(export_cfg(run, f"export.quant={quant}", f"export.output={tmp_path / quant}",
                                 "export.verify=none"), run)
    path = out / f"demo-{quant}.gguf"
    ref = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run / "merged")
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    got_tok = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    text = tok.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert got_tok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert got_tok.chat_template == tok.chat_template
    seq = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        a, b = ref(seq).logits, got(seq).logits
    assert (a - b).abs().max() < rel_tol * a.abs().max()  # rounding of the weights, not another model
    assert greedy(got, tok, PROMPTS) == greedy(ref, tok, PROMPTS)
    report = json.loads((out / "export.json").read_text())
    assert report["tensor_types"][quant.upper()] == 15 and report["verification"] == {"skipped": "export.verify=none"}


def test_q8_0_is_about_half_of_f16(run, f16_cli, tmp_path):
    out = export_gguf(export_cfg(run, "export.quant=q8_0", f"export.output={tmp_path}/q", "export.verify=none"), run)
    q8, f16 = (out / "demo-q8_0.gguf").stat().st_size, f16_cli["bytes"]
    assert 0.45 < q8 / f16 < 0.6  # 34 bytes per 32 weights vs 64; norms, biases and metadata stay as they are


def test_verification_report_of_a_quantized_export(run, tmp_path):
    out = export_gguf(export_cfg(run, "export.quant=q8_0", f"export.output={tmp_path}/q", "export.verify=transformers",
                                 f"export.prompts={run}/prompts.jsonl"), run)
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["reader"] == "transformers" and v["prompt_source"] == f"{run}/prompts.jsonl" and v["prompts"] == 4
    assert v["tokenizer_identical"] and v["chat_template_identical"]
    assert v["identical_greedy_outputs"] == 4 and v["ok"] and "warning" not in v
    assert 0 < v["max_abs_logit_diff"] < 0.02 * v["max_abs_logit"]
    # every reply ended at <|im_end|> on both sides: 5 to 16 tokens, all equal
    assert all(r["reference_tokens"] == r["gguf_tokens"] == r["matching_prefix"] < 24 for r in v["rows"])


def test_verification_defaults_to_the_runs_val_split(run, tmp_path):
    out = export_gguf(export_cfg(run, f"export.output={tmp_path}/v", "export.verify_prompts=2",
                                 "export.verify_max_new_tokens=4"), run)
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["prompt_source"] == "val split" and v["prompts"] == 2 and v["tokenizer_identical"]
    assert v["ok"] == (v["identical_greedy_outputs"] == 2)


def test_unsupported_architecture_fails_before_writing(run, tmp_path):
    merged = tmp_path / "gemma"
    shutil.copytree(run / "merged", merged)
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "architectures": ["GemmaForCausalLM"]}))
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=r"GemmaForCausalLM.*not supported.*supported: Qwen2ForCausalLM, "
                                            r"LlamaForCausalLM.*nothing was written.*convert_hf_to_gguf"):
        export_gguf(export_cfg(run, f"export.model={merged}", f"export.output={out}"), run)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                          "original_max_position_embeddings": 32768}}, "rope scaling 'yarn'"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding-window"),
])
def test_settings_llama_cpp_would_ignore_fail_before_writing(run, tmp_path, change, message):
    merged = tmp_path / "m"
    shutil.copytree(run / "merged", merged)
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FinetuneError, match=message):
        export_gguf(export_cfg(run, f"export.model={merged}", f"export.output={tmp_path}/out"), run)
    assert not (tmp_path / "out").exists()


def test_extra_or_missing_tensors_fail_before_writing(run, tmp_path):
    from safetensors.torch import load_file, save_file

    merged = tmp_path / "m"
    shutil.copytree(run / "merged", merged)
    weights = load_file(merged / "model.safetensors")
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)  # a Qwen3 tensor: no place in qwen2
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FinetuneError) as e:
        export_gguf(export_cfg(run, f"export.model={merged}", f"export.output={tmp_path}/out"), run)
    assert "missing tensors: blk.1.attn_k.bias" in str(e.value)
    assert "no GGUF name: model.layers.0.self_attn.q_norm.weight" in str(e.value) and not (tmp_path / "out").exists()


def test_tokenizer_without_a_known_llama_cpp_pre_tokenizer_is_refused(run, tmp_path):
    from finetune.export.gguf import check_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(run / "merged", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    # A qwen2 config makes transformers rebuild Qwen's own split (so that one is what llama.cpp must match);
    # any other model type keeps tokenizer.json's.
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(FinetuneError, match="no llama.cpp equivalent known"):
        check_tokenizer(folder)
    assert check_tokenizer(run / "merged")[1] == "qwen2"


def test_existing_output_needs_overwrite_and_is_replaced_whole(run, tmp_path):
    out = tmp_path / "out"
    cfg = export_cfg(run, f"export.output={out}", "export.verify=none")
    export_gguf(cfg, run)
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(FinetuneError, match="already exists.*export.overwrite=true"):
        export_gguf(cfg, run)
    export_gguf(export_cfg(run, f"export.output={out}", "export.verify=none", "export.overwrite=true"), run)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "demo-f16.gguf", "export.json"]


def test_a_crash_while_writing_leaves_nothing_behind(run, tmp_path, monkeypatch):
    calls = []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the tensors
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(export_cfg(run, f"export.output={tmp_path}/out", "export.verify=none"), run)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_run_without_merged_model_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    from omegaconf import OmegaConf

    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(), resolve=True))
    res = run_cli("export", f"run={run}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"run={run} has no merged model" in res.stderr and "finetune merge run=" in res.stderr


def test_config_problems_are_listed_together():
    from finetune.config import ExportConfig

    problems = ExportConfig(quant="q3", verify="ollama", verify_max_new_tokens=0, name="a/b").problems()
    assert len(problems) == 4
    assert problems[0] == ("export.quant='q3': use one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, or with "
                           "llama-cpp-python installed q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k")
    assert ExportConfig().problems() == [] and ExportConfig(quant="q4_k_m").problems() == []


def test_k_quants_without_llama_cpp_fail_before_writing(run, tmp_path, monkeypatch):
    import finetune.export.verify

    monkeypatch.setattr(finetune.export.verify, "llama_cpp_available", lambda: False)
    with pytest.raises(FinetuneError, match=r"q4_k_m is made by llama.cpp's quantizer: pip install 'finetune\[llamacpp\]'"):
        export_gguf(export_cfg(run, "export.quant=q4_k_m", f"export.output={tmp_path}/out"), run)
    with pytest.raises(FinetuneError, match=r"export.verify=llama_cpp needs llama-cpp-python"):
        export_gguf(export_cfg(run, "export.verify=llama_cpp", f"export.output={tmp_path}/out"), run)
    assert list(tmp_path.iterdir()) == []


def test_a_file_whose_tokenizer_reads_differently_is_not_published(run, tmp_path, monkeypatch):
    import finetune.export.gguf as writer

    table = writer._token_table

    def special_tokens_as_text(gguf_mod, tokenizer, n_vocab):  # a converter bug: <|im_start|> becomes plain text
        tokens, types = table(gguf_mod, tokenizer, n_vocab)
        return tokens, [gguf_mod.TokenType.NORMAL if t == gguf_mod.TokenType.CONTROL else t for t in types]

    monkeypatch.setattr(writer, "_token_table", special_tokens_as_text)
    with pytest.raises(FinetuneError, match="tokenizes prompt 0 differently.*not published"):
        export_gguf(export_cfg(run, f"export.output={tmp_path}/out", "export.verify=transformers",
                               f"export.prompts={run}/prompts.jsonl"), run)
    assert list(tmp_path.iterdir()) == []


def test_untied_output_head_is_written_and_used(run, tmp_path):
    """A merge that changed lm_head alone (modules_to_save) stores it apart; the GGUF must carry output.weight."""
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    model.config.tie_word_embeddings = False
    head = model.lm_head.weight.detach().clone()
    model.lm_head.weight = torch.nn.Parameter(head * torch.linspace(0.5, 1.5, head.shape[1]))  # not the embedding
    merged = tmp_path / "untied"
    model.save_pretrained(merged)
    AutoTokenizer.from_pretrained(run / "merged").save_pretrained(merged)
    shutil.copy(run / "merged" / "generation_config.json", merged)
    out = export_gguf(export_cfg(run, f"export.model={merged}", f"export.output={tmp_path}/out",
                                 "export.verify=transformers", f"export.prompts={run}/prompts.jsonl"), run)
    names = {t.name for t in gguf.GGUFReader(out / "demo-f16.gguf").tensors}
    assert "output.weight" in names
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["max_abs_logit_diff"] < 2e-3 * v["max_abs_logit"]  # f16 rounding only: the head was the one used
