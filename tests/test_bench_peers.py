"""benchmarks/peers.py: peer frameworks' status, the reasons a peer is not run, the LLaMA-Factory config it writes,
and how a failing peer CLI is reported. No peer is installed or run here (make peers does that)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"


@pytest.fixture
def peers(tmp_path, monkeypatch):
    mod = load_script(SCRIPT, "bench_peers")
    monkeypatch.setattr(mod, "VENVS", tmp_path / "venvs")
    return mod


def _job(peers, tmp_path: Path, **kw):
    fields = dict(model_dir=str(tmp_path / "model"), train_jsonl=str(tmp_path / "rows_train.jsonl"),
                  val_jsonl=str(tmp_path / "rows_val.jsonl"), out_dir=str(tmp_path / "out"), template="smollm2",
                  max_length=2048, micro_batch=1, accumulation=4, learning_rate=2e-4, lr_scheduler="cosine",
                  warmup=0.03, weight_decay=0.0, max_grad_norm=1.0, seed=42, r=16, lora_alpha=32, lora_dropout=0.05,
                  dtype="bfloat16")
    return peers.Job(**{**fields, **kw})


def _installed(peers, name: str) -> Path:
    venv = peers.venv_dir(name)
    (venv / "bin").mkdir(parents=True)
    (venv / "peer-status.json").write_text(json.dumps({"ok": True, "version": "0.0.1"}))
    return venv


def test_a_peer_that_is_not_installed_is_reported_with_what_to_run(peers, tmp_path):
    assert peers.status("axolotl") == {"ok": False, "reason": "not installed: run `make peers` "
                                                              "(benchmarks/peers.py install axolotl)"}
    with pytest.raises(peers.PeerFailed, match="make peers"):
        peers.run("axolotl", _job(peers, tmp_path))
    failed = peers.venv_dir("litgpt")
    failed.mkdir(parents=True)
    (failed / "peer-status.json").write_text(json.dumps({"ok": False, "reason": "pip failed (exit 1): ERROR: x"}))
    with pytest.raises(peers.PeerFailed, match="pip failed"):
        peers.run("litgpt", _job(peers, tmp_path))


def test_an_installed_peer_without_a_runner_says_why(peers, tmp_path):
    _installed(peers, "torchtune")
    with pytest.raises(peers.PeerFailed, match="no runner is written for it yet: torchtune trains its own"):
        peers.run("torchtune", _job(peers, tmp_path))


def test_llamafactory_gets_its_best_cpu_settings_on_the_shared_rows(peers, tmp_path, monkeypatch):
    seen = {}

    def fake_cli(name, cmd, out_dir, env=None):  # what llamafactory-cli leaves in its output_dir
        seen.update(name=name, cmd=cmd, env=env, config=json.loads(Path(cmd[2]).read_text()))
        run = Path(seen["config"]["output_dir"])
        run.mkdir(parents=True)
        (run / "all_results.json").write_text(json.dumps({"train_runtime": 12.5, "train_loss": 3.0}))
        (run / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
        (run / "adapter_config.json").write_text("{}")
        return ""

    _installed(peers, "llamafactory")
    monkeypatch.setattr(peers, "_cli", fake_cli)
    out = peers.run("llamafactory", _job(peers, tmp_path))
    assert (out["train_s"], out["steps"], out["quant"]) == (12.5, 7, "nf4") and Path(out["adapter_dir"]).is_dir()
    c = seen["config"]
    assert seen["cmd"][:2] == ["llamafactory-cli", "train"] and seen["cmd"][2].endswith(".yaml")
    assert (c["packing"], c["neat_packing"], c["disable_gradient_checkpointing"]) == (True, True, True)
    assert (c["quantization_bit"], c["finetuning_type"], c["lora_rank"], c["lora_target"]) == (4, "lora", 16, "all")
    assert (c["per_device_train_batch_size"], c["gradient_accumulation_steps"], c["cutoff_len"]) == (1, 4, 2048)
    assert (c["warmup_ratio"], c["bf16"], c["use_cpu"], c["template"]) == (0.03, True, True, "smollm2")
    info = json.loads((Path(c["dataset_dir"]) / "dataset_info.json").read_text())[c["dataset"]]
    assert info["file_name"] == str(tmp_path / "rows_train.jsonl") and info["formatting"] == "sharegpt"
    assert info["tags"]["assistant_tag"] == "assistant"
    peers.run("llamafactory", _job(peers, tmp_path, warmup=5, dtype="float32"))  # a step count, fp32
    assert seen["config"]["warmup_steps"] == 5 and "warmup_ratio" not in seen["config"]
    assert seen["config"]["bf16"] is False


def test_axolotl_runs_one_process_without_cuda_kernels_or_telemetry(peers, tmp_path, monkeypatch):
    seen = {}

    def fake_cli(name, cmd, out_dir, env=None):
        seen.update(cmd=cmd, env=env, config=json.loads(Path(cmd[2]).read_text()))
        run = Path(seen["config"]["output_dir"])
        run.mkdir(parents=True)
        (run / "adapter_config.json").write_text("{}")
        return ("{'loss': '12.16', 'learning_rate': '0.0002'}\n"
                "{'train_runtime': '40.0', 'train_samples_per_second': '1.01', 'train_steps_per_second': '0.2'}\n")

    _installed(peers, "axolotl")
    monkeypatch.setattr(peers, "_cli", fake_cli)
    out = peers.run("axolotl", _job(peers, tmp_path, dtype="float32"))
    assert (out["train_s"], out["steps"], out["quant"]) == (40.0, 8, "nf4") and out["adapter_dir"]
    c = seen["config"]
    assert seen["cmd"][:2] == ["axolotl", "train"] and seen["cmd"][-2:] == ["--launcher", "python"]
    assert seen["env"]["AXOLOTL_DO_NOT_TRACK"] == "1"
    assert (c["adapter"], c["load_in_4bit"], c["sample_packing"], c["gradient_checkpointing"], c["bf16"]) == (
        "qlora", True, True, False, False)
    assert not (c["lora_qkv_kernel"] or c["lora_o_kernel"] or c["lora_mlp_kernel"])  # CUDA-only kernels
    assert c["datasets"][0]["path"] == str(tmp_path / "rows_train.jsonl") and c["sequence_len"] == 2048
    assert (c["micro_batch_size"], c["gradient_accumulation_steps"], c["val_set_size"]) == (1, 4, 0)
    # bf16 without a GPU needs TrainingArguments(use_cpu=True), which only a plugin can pass
    assert c["plugins"] == ["bench_axolotl_cpu.CPUTrainingArgs"]
    plugin_dir = Path(seen["env"]["PYTHONPATH"])
    assert 'return {"use_cpu": True}' in (plugin_dir / "bench_axolotl_cpu.py").read_text()


SMOLLM2_HF = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
              "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
              "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _rows(path: Path, rows: list[list[tuple[str, str]]]) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) + "\n"
                            for row in rows))


def test_litgpt_maps_the_hf_config_onto_its_named_family_config_or_says_why_not(peers):
    want = peers.litgpt_fields(SMOLLM2_HF)
    assert want == {"base": "SmolLM2-135M-Instruct", "n_layer": 30, "n_embd": 576, "n_head": 9, "n_query_groups": 3,
                    "head_size": 64, "intermediate_size": 1536, "padded_vocab_size": 49152, "block_size": 8192,
                    "rope_base": 100000.0, "norm_eps": 1e-05, "attn_bias": False, "bias": False}
    qwen = peers.litgpt_fields({**SMOLLM2_HF, "model_type": "qwen2", "rope_parameters": None, "rope_theta": 1e6})
    assert (qwen["base"], qwen["attn_bias"], qwen["rope_base"]) == ("Qwen2.5-0.5B-Instruct", True, 1e6)
    with pytest.raises(peers.PeerFailed, match="model_type 'gemma2'"):
        peers.litgpt_fields({**SMOLLM2_HF, "model_type": "gemma2"})
    with pytest.raises(peers.PeerFailed, match="rope scaling 'yarn'"):
        peers.litgpt_fields({**SMOLLM2_HF, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}})
    compile(peers.LITGPT_PREPARE, "prepare.py", "exec")  # the script it runs in litgpt's venv


def test_litgpt_batches_hold_the_projects_tokens_per_step_in_at_least_two_steps(peers, tmp_path):
    job = _job(peers, tmp_path, micro_batch=1, accumulation=4, max_length=2048, warmup=0.03)
    assert peers.litgpt_schedule(job, [200] * 288) == (1, 7, 41, 1)  # 8,192 tokens ~ 41 rows of 200
    assert peers.litgpt_schedule(job, [200] * 22) == (1, 2, 11, 1)  # fewer tokens than one step: 2 steps
    assert peers.litgpt_schedule(_job(peers, tmp_path, warmup=5), [200] * 22)[3] == 1  # warmup < steps
    with pytest.raises(peers.PeerFailed, match="at least 2 micro-batches"):
        peers.litgpt_schedule(job, [200])


def test_litgpt_gets_chat_rows_in_its_format_and_its_best_cpu_settings(peers, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2_HF))
    (model / "tokenizer.json").write_text("{}")
    _rows(tmp_path / "rows_train.jsonl", [[("user", "hi there"), ("assistant", "yo")]] * 21
          + [[("system", "Be brief."), ("user", "q"), ("assistant", "a")]])
    _rows(tmp_path / "rows_val.jsonl", [[("user", "v"), ("assistant", "w")]])
    calls = []

    def fake_cli(name, cmd, out_dir, env=None):
        calls.append(cmd)
        if cmd[0] == "python":  # prepare.py: conversion + lengths
            return 'noise\nLITGPT_PREPARE {"model_name": "SmolLM2-135M-Instruct", "overrides": {}, ' \
                   f'"lengths": {json.dumps([200] * 22)}}}\n'
        run = Path(json.loads(Path(cmd[-1]).read_text())["out_dir"]) / "logs" / "csv" / "version_0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("iter,loss,val_loss\n22,3.1,\n,,2.34567\n")
        return ("Epoch 1 | iter 11 step 1 | loss train: 3.0, val: n/a | iter time: 9.0 ms (step)\n"
                "Epoch 1 | iter 22 step 2 | loss train: 3.0, val: n/a | iter time: 9.0 ms (step)\n"
                "| - Training Time             :  12.34 s\nFinal evaluation | val loss: 2.346 | val ppl: 10.4\n")

    _installed(peers, "litgpt")
    monkeypatch.setattr(peers, "_cli", fake_cli)
    out = peers.run("litgpt", _job(peers, tmp_path))
    assert (out["train_s"], out["steps"], out["adapter_dir"], out["peer_val_loss"]) == (12.34, 2, None, 2.34567)
    assert out["quant"].startswith("none (bnb.nf4 needs CUDA") and "val_loss_note" in out["settings"]
    work = tmp_path / "out" / "litgpt"
    train = json.loads((work / "data" / "train.json").read_text())
    assert train[0] == {"instruction": "hi there", "output": "yo"} and len(train) == 22
    assert train[-1] == {"instruction": "q", "output": "a", "sys_prompt": "Be brief."}
    assert json.loads((work / "data" / "val.json").read_text()) == [{"instruction": "v", "output": "w"}]
    want, ckpt, data, style = calls[0][2:]
    assert json.loads(want)["base"] == "SmolLM2-135M-Instruct" and style == "smollm2"
    assert (Path(ckpt) / "config.json").resolve() == model / "config.json" and Path(data) == work / "data"
    assert not Path(ckpt).name.startswith("SmolLM2")  # litgpt would add a BOS the HF template has not
    assert calls[1][:3] == ["litgpt", "finetune_lora", "--config"]
    c = json.loads(Path(calls[1][3]).read_text())
    assert (c["precision"], c["quantize"], c["lora_r"], c["lora_alpha"]) == ("bf16-true", None, 16, 32)
    assert all(c[f"lora_{k}"] for k in ("query", "key", "value", "projection", "mlp")) and not c["lora_head"]
    assert (c["train"]["micro_batch_size"], c["train"]["global_batch_size"], c["train"]["epochs"]) == (1, 11, 1)
    assert (c["train"]["max_seq_length"], c["train"]["lr_warmup_steps"], c["seed"]) == (2048, 1, 42)
    d = c["data"]["init_args"]
    assert (c["data"]["class_path"], d["mask_prompt"], d["prompt_style"], d["num_workers"]) == (
        "litgpt.data.JSON", True, "smollm2", 0)
    assert c["optimizer"]["init_args"] == {"lr": 2e-4, "weight_decay": 0.0}
    peers.run("litgpt", _job(peers, tmp_path, dtype="float32", template="chatml"))
    c = json.loads(Path(calls[-1][3]).read_text())
    assert (c["precision"], c["data"]["init_args"]["prompt_style"]) == ("32-true", "qwen3")  # plain ChatML


def test_litgpt_refuses_multi_turn_rows(peers, tmp_path):
    _rows(tmp_path / "rows.jsonl", [[("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]])
    with pytest.raises(peers.PeerFailed, match="one user turn and one reply; row 1"):
        peers.litgpt_rows(str(tmp_path / "rows.jsonl"))


LITGPT_VENV = ROOT / ".venv-peers" / "litgpt" / "bin" / "python"


@pytest.mark.skipif(not LITGPT_VENV.is_file(), reason="litgpt peer venv not installed (make peers)")
@pytest.mark.parametrize("template", ["chatml", "smollm2"])
def test_litgpt_prompt_style_renders_the_models_chat_template(peers, tmp_path, template):
    from transformers import AutoTokenizer

    if template == "chatml":
        from finetune.models.tiny import tiny_model_dir
        model = tiny_model_dir()
    else:
        from finetune.errors import FinetuneError
        from finetune.models.gguf import smollm2_model_dir

        try:  # converted once into the test cache, as for tests/test_realmodel_e2e.py
            model = smollm2_model_dir()
        except FinetuneError as e:
            pytest.skip(f"no SmolLM2 weights: {e}")
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]
    _rows(tmp_path / "rows.jsonl", [[(m["role"], m["content"]) for m in messages]])
    row = peers.litgpt_rows(str(tmp_path / "rows.jsonl"))[0]
    code = ("import json, sys\nfrom litgpt.prompts import PromptStyle\nr = json.loads(sys.argv[2])\n"
            "print(json.dumps(PromptStyle.from_name(sys.argv[1]).apply(prompt=r['instruction'], **r) + r['output']))")
    proc = subprocess.run([str(LITGPT_VENV), "-c", code, peers.LITGPT_PROMPT_STYLES[template], json.dumps(row)],
                          capture_output=True, text=True, timeout=120, check=True)
    hf = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, tokenize=False)
    assert json.loads(proc.stdout) + "<|im_end|>\n" == hf  # litgpt appends the EOS token (<|im_end|>) itself


def test_a_failing_peer_cli_is_reported_by_its_error_line(peers, tmp_path):
    venv = _installed(peers, "llamafactory")
    cli = venv / "bin" / "fakecli"
    cli.write_text("#!/bin/sh\necho 'Traceback (most recent call last):'\necho '  File x'\n"
                   "echo 'ValueError: bitsandbytes needs CUDA'\necho 'some trailing noise'\nexit 3\n")
    cli.chmod(0o755)
    with pytest.raises(peers.PeerFailed) as e:
        peers._cli("llamafactory", ["fakecli"], tmp_path / "out")
    assert str(e.value) == "fakecli failed (exit 3): ValueError: bitsandbytes needs CUDA"
    assert "some trailing noise" in (tmp_path / "out" / "cli.log").read_text()


def test_stubbed_module_fails_only_when_used(peers):
    peer = peers.Peer("demo", ["demo==1"], "demo", stubs=["fakeaudio"])
    site = peers.venv_dir("demo") / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    peers.write_stubs(peer)
    proc = subprocess.run([sys.executable, "-c", "import fakeaudio\ntry:\n    fakeaudio.load\n"
                           "except ImportError as e:\n    print(e)"], cwd=site, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and "fakeaudio is a stub" in proc.stdout


def test_unknown_peer_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "status", "unsloth"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "unsloth" in proc.stderr and "llamafactory" in proc.stderr
