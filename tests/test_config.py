"""Config tree: every shipped file composes and validates; bad keys, types and values are reported clearly."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.support import run_cli
from finetune.errors import ConfigError
from finetune.paths import CONFIG_DIR
from finetune.config import FinetuneConfig, register_configs, to_typed, validate

register_configs()
GROUPS = ["model", "quant", "peft", "data", "train", "eval", "merge", "generate", "export"]


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def shipped_options():
    for group in GROUPS + ["experiment"]:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(shipped_options()))
def test_every_shipped_config_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    typed = validate(to_typed(cfg))
    assert isinstance(typed, FinetuneConfig)
    if group != "experiment":
        assert OmegaConf.select(cfg, group) is not None


def test_defaults_are_general_not_a_demo_preset(tmp_path):
    mine = tmp_path / "My-Llama-3B"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')
    typed = validate(to_typed(compose_cfg()))
    assert typed.model.name_or_path == "embedded:tiny"
    assert typed.quant.method == "nf4" and typed.quant.double_quant and typed.quant.compute_dtype == "auto"
    assert (typed.peft.r, typed.peft.lora_alpha, typed.peft.lora_dropout) == (16, 32, 0.05)
    assert typed.peft.target_modules == "all-linear"
    general = validate(to_typed(compose_cfg([f"model.name_or_path={mine}"])))
    demo = validate(to_typed(compose_cfg(["experiment=tiny_demo"])))
    assert typed.train.learning_rate == general.train.learning_rate != demo.train.learning_rate
    assert typed.train.max_steps == general.train.max_steps != demo.train.max_steps
    assert (typed.name, general.name, demo.name) == ("tiny", "my-llama-3b", "tiny_demo")


def test_the_main_demo_is_the_real_model():
    typed = validate(to_typed(compose_cfg(["experiment=demo"])))
    assert typed.model.name_or_path == "embedded:smollm2-135m-instruct" and typed.name == "demo"
    assert typed.model.architecture is None  # numbers come from the converted model's config.json
    assert {s.path for s in typed.data.sources} >= {"demo:extraction_train.jsonl", "demo:extraction_val.jsonl"}


def test_real_experiment_targets_qwen_3b():
    typed = validate(to_typed(compose_cfg(["experiment=qwen2_5_3b_json_qlora"])))
    assert typed.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert typed.model.context_length is None  # read from the model's config.json, never a preset's number
    assert typed.model.architecture_of == typed.model.name_or_path
    assert typed.model.architecture["num_hidden_layers"] == 36


def test_unknown_key_fails_at_compose_time_naming_the_key():
    res = run_cli("train", "train.lerning_rate=1e-4", "--cfg", "job")
    assert res.returncode != 0
    assert "lerning_rate" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_wrong_type_fails_naming_the_key():
    res = run_cli("train", "train.learning_rate=fast", "--cfg", "job")
    assert res.returncode != 0
    assert "learning_rate" in res.stderr and "fast" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cross_field_validation_lists_every_problem_at_once():
    cfg = to_typed(compose_cfg(["peft.r=0", "peft.lora_dropout=1.5", "train.optim=adamw_9bit",
                                "quant=int8", "merge.base=nf4_roundtrip"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for key in ("peft.r=0", "peft.lora_dropout=1.5", "train.optim='adamw_9bit'", "merge.base=nf4_roundtrip"):
        assert key in text, text
    assert len(err.value.problems) == 4


def test_bad_value_through_cli_is_one_clear_message(tmp_path):
    res = run_cli("train", "peft.r=-1", "train.learning_rate=0", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2
    assert "peft.r=-1" in res.stderr and "train.learning_rate=0" in res.stderr
    assert "Traceback" not in res.stderr


def test_constrained_decoding_requires_schema_key_order():
    cfg = to_typed(compose_cfg(["generate.constrain=json_schema", "data.structured.key_order=sorted"]))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "data.structured.key_order='sorted'" in str(err.value)
    validate(to_typed(compose_cfg(["generate.constrain=json_schema"])))  # schema order (default) is fine


def test_shipped_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3"}
    for f in files:
        cfg = ClusterConfig.from_yaml_file(str(f))  # rejects unknown keys
        assert cfg.num_processes >= 1
