"""Mixing sources by weight, val split by fraction or source, seeded shuffles, max_samples, Hydra overrides."""
from __future__ import annotations

import json
from collections import Counter

from finetune.paths import CONFIG_DIR


def _rows(n, tag):
    return [{"prompt": f"{tag} question {i}?", "completion": f"{tag} answer {i}."} for i in range(n)]


def _src(path, **kw):
    return {"path": path, "format": "completion", **kw}


def _tags(split):
    return Counter(t.split()[0] for t in split["target"])


def test_weights_repeat_or_subsample_train_rows_only(build, write_jsonl):
    a, b = write_jsonl(_rows(10, "A"), "a.jsonl"), write_jsonl(_rows(10, "B"), "b.jsonl")
    v = write_jsonl(_rows(4, "V"), "v.jsonl")
    splits = build(_src(a, weight=2.0), _src(b, weight=0.5), _src(v, split="val", weight=3.0))
    assert _tags(splits.train) == {"A": 20, "B": 5}
    assert _tags(splits.val) == {"V": 4}
    assert splits.stats["rows_kept"] == 24 and splits.stats["train"]["rows"] == 25
    assert [s["rows_in_train"] for s in splits.stats["sources"]] == [20, 5, 0]


def test_val_fraction_holds_out_without_overlap(build, write_jsonl):
    path = write_jsonl(_rows(20, "A"))
    splits = build(_src(path), val_fraction=0.25)
    assert len(splits.val) == 5 and len(splits.train) == 15
    assert not set(splits.val["origin"]) & set(splits.train["origin"])


def test_shuffle_is_deterministic_by_seed(build, write_jsonl):
    path = write_jsonl(_rows(30, "A"))
    first = build(_src(path), val_fraction=0.2, seed=1)
    again = build(_src(path), val_fraction=0.2, seed=1)
    other = build(_src(path), val_fraction=0.2, seed=2)
    assert first.train["origin"] == again.train["origin"] and first.val["origin"] == again.val["origin"]
    assert first.train["origin"] != other.train["origin"]
    assert sorted(first.train["origin"]) != first.train["origin"]  # actually shuffled


def test_max_samples_keeps_first_good_rows(build, write_jsonl):
    path = write_jsonl(["broken"] + _rows(10, "A"))
    splits = build(_src(path, max_samples=3), max_bad_fraction=0.5)
    assert sorted(splits.train["target"]) == ["A answer 0.", "A answer 1.", "A answer 2."]
    assert splits.stats["rows_read"] == 4 and splits.stats["rows_dropped"] == {"bad_json": 1}


def test_hydra_accepts_sources_override_from_the_command_line():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from finetune.config import SourceConfig, register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "data.sources=[{path:my.jsonl,format:alpaca},{path:v.jsonl,format:alpaca,split:val,columns:{output:answer}},"
            "{path:s.jsonl,format:structured,schema:{type:object},table_columns:[a,b]}]",
            "data.too_long=truncate_prompt"])
    typed = to_typed(cfg)
    assert typed.data.sources == [
        SourceConfig(path="my.jsonl", format="alpaca"),
        SourceConfig(path="v.jsonl", format="alpaca", split="val", columns={"output": "answer"}),
        SourceConfig(path="s.jsonl", format="structured", schema={"type": "object"}, table_columns=["a", "b"])]
    assert typed.data.too_long == "truncate_prompt"
    assert OmegaConf.to_container(cfg.data.sources)[0]["weight"] == 1.0


def test_demo_config_composes_from_the_shipped_configs():
    from hydra import compose, initialize_config_dir

    from finetune.config import register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        typed = to_typed(compose(config_name="config", overrides=["data=demo"]))
    assert [s.path for s in typed.data.sources][:2] == ["demo:structured_train.jsonl", "demo:structured_val.jsonl"]
    assert typed.data.problems() == []
    json.dumps([s.__dict__ for s in typed.data.sources])  # plain values all the way down
