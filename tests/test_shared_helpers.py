"""The one copy of things several stages share: held-out prompts, atomic folder publishing, checkpoint listing,
the preflight of `finetune train`, and the merged model card's header."""
import json
import os
import stat

import pytest

from finetune.errors import DataError, FinetuneError
from finetune.files import publish_folder


def _cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from finetune.config import register_configs, to_typed, validate
    from finetune.paths import CONFIG_DIR

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return validate(to_typed(compose("config", overrides=["device=cpu", *overrides])))


def test_held_out_prompts_end_before_the_reply_and_keep_schema_and_target(tiny_tokenizer):
    from finetune.generate.prompts import check_conversations, held_out_prompts

    cfg = _cfg()
    rows, source = held_out_prompts(cfg.data, tiny_tokenizer, 3)
    assert source == "val split" and len(rows) == 3
    for r in rows:
        assert r.messages[-1]["role"] == "user" and r.extra["target"] and r.origin
    assert any(r.schema for r in rows)  # the demo's structured rows carry their JSON schema
    convs, source = check_conversations(None, "merge.prompts", cfg.data, tiny_tokenizer, 2)
    assert convs == [r.messages for r in rows[:2]] and source == "val split"


def test_check_conversations_reads_the_file_and_names_the_key(tmp_path, tiny_tokenizer):
    from finetune.generate.prompts import check_conversations

    cfg = _cfg()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "three"}\n')
    convs, source = check_conversations(str(path), "export.prompts", cfg.data, tiny_tokenizer, 2)
    assert convs == [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    assert source == str(path)
    with pytest.raises(DataError, match=r"export.prompts='.*nope.jsonl': file not found"):
        check_conversations(str(tmp_path / "nope.jsonl"), "export.prompts", cfg.data, tiny_tokenizer, 2)
    with pytest.raises(FinetuneError, match="pass export.prompts=<jsonl file> or run=<run dir>"):
        check_conversations(None, "export.prompts", cfg.data, tiny_tokenizer, 2, have_data=False)


def test_publish_folder_swaps_whole_and_gives_usual_modes(tmp_path):
    import tempfile

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = tempfile.mkdtemp(dir=tmp_path)  # 0700, as every staging folder is made
    (tmp_path / tmp / "sub").mkdir()
    fd, _ = tempfile.mkstemp(dir=tmp, suffix=".json")  # 0600
    os.close(fd)
    publish_folder(tmp_path / tmp, out)
    assert not (out / "old.txt").exists() and (out / "sub").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging, no old copy left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~umask  # folders stay enterable
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.glob("*.json"))


def test_checkpoint_cleanup_removes_an_old_copy_a_crash_left(tmp_path):
    from finetune.train.checkpoint import REQUIRED_FILES, clean_staging, complete_checkpoints

    root = tmp_path / "checkpoints"
    (root / ".tmp-old-checkpoint-2-abc" / "checkpoint-2").mkdir(parents=True)  # publish_folder's aside copy
    for step, files in ((1, REQUIRED_FILES), (2, REQUIRED_FILES[1:])):
        (root / f"checkpoint-{step}").mkdir()
        for f in files:
            (root / f"checkpoint-{step}" / f).write_text("x")
    assert clean_staging(root) == [root / ".tmp-old-checkpoint-2-abc"]
    assert complete_checkpoints(root) == [root / "checkpoint-1"]  # checkpoint-2 lacks trainer_state.json


def test_eval_scores_the_checkpoints_the_train_stage_lists(tmp_path, monkeypatch):
    """evaluation's checkpoint history lists checkpoints through finetune.train.checkpoint, not its own glob."""
    import finetune.evaluation.run as run_mod
    from finetune.train.checkpoint import ADAPTER_FILES, REQUIRED_FILES

    for step, files in ((3, REQUIRED_FILES), (10, ADAPTER_FILES), (7, ADAPTER_FILES[:1])):
        d = tmp_path / "checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_text(f"{step}")
    # checkpoint-10's optimizer state was deleted to save space: it still scores; checkpoint-7 has no weights
    seen = []
    monkeypatch.setattr(run_mod, "_merged_checkpoint", lambda cfg, ckpt, device: seen.append(ckpt.name))
    monkeypatch.setattr(run_mod, "evaluate_model", lambda *a: ({"exact_match": 1.0}, []))
    history = run_mod._checkpoint_history(_cfg(), tmp_path, {"exact_match": 0.5}, [], None)
    assert [h["step"] for h in history] == [3, 10] and seen == ["checkpoint-3", "checkpoint-10"]


def test_training_preflight_runs_once_before_anything_is_written(tmp_path, monkeypatch):
    import finetune.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "preflight", lambda cfg: calls.append("preflight"))
    monkeypatch.setattr(pipeline, "resolve_resume", lambda cfg, run_dir: calls.append("resume"))

    class Stop(Exception):
        pass

    def before_write():
        calls.append("write")
        raise Stop

    with pytest.raises(Stop):
        pipeline.run_training(_cfg(), tmp_path, before_write=before_write)
    assert calls == ["preflight", "resume", "write"]
    assert not [p.name for p in tmp_path.iterdir() if p.name != ".lock"]  # nothing but the run lock yet


def test_train_recipe_leaves_the_checks_to_the_pipeline():
    """recipes/train.py saves config.yaml through run_training's hook instead of checking a second time."""
    from finetune.paths import RECIPES_DIR

    source = (RECIPES_DIR / "train.py").read_text()
    assert "preflight(" not in source and "resolve_resume(" not in source and "before_write=" in source


def test_model_card_header_is_huggingface_hub_metadata_with_the_base_license(tmp_path):
    from huggingface_hub import ModelCard

    from finetune.merge.model_card import write_model_card

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# base\n")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "parity.json").write_text(json.dumps({"merge": {"base": "original", "dtype": "float32"}}))
    card = ModelCard.load(write_model_card(tmp_path / "merged", None, config={"model": {"name_or_path": str(base)}}))
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.tags == ["finetune", "lora", "merged"] and card.data.base_model is None  # a local folder
    assert f"LoRA adapter merged into {base}" in card.text
    hub = ModelCard.load(write_model_card(tmp_path / "merged", None,
                                          config={"model": {"name_or_path": "Qwen/Qwen2.5-3B-Instruct"}}))
    assert hub.data.base_model == "Qwen/Qwen2.5-3B-Instruct"
