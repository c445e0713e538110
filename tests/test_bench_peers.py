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
