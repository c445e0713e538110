"""The train / peft / quant groups: bad values reported all at once, CUDA-only options refused on CPU, and our
settings reaching trl's SFTConfig and peft's LoraConfig under transformers' names."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.support import run_cli
from finetune.errors import ConfigError
from finetune.models.load import check_target_modules, load_base_model, resolve_dtype
from finetune.paths import CONFIG_DIR
from finetune.config import register_configs, to_typed, validate
from finetune.train.sft import check_environment, lora_config, sft_config, use_gradient_checkpointing

register_configs()


def typed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=list(overrides)))


def test_bad_values_are_all_reported_at_once_naming_each_key():
    cfg = typed("train.train_sampling_strategy=by_length", "peft.r=0", "peft.lora_dropout=1.0", "train.optim=adamw_9bit", "train.neftune_noise_alpha=-1",
                "train.report_to=[tensorbord]", "peft.init_lora_weights=svd", "train.warmup_steps=2.5",
                "train.max_grad_norm=-1", "train.loraplus_lr_ratio=0.5")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for key in ("train.train_sampling_strategy='by_length'", "peft.r=0", "peft.lora_dropout=1.0", "train.optim='adamw_9bit'", "train.neftune_noise_alpha=-1",
                "train.report_to has ['tensorbord']", "peft.init_lora_weights='svd'", "train.warmup_steps=2.5",
                "train.max_grad_norm=-1", "train.loraplus_lr_ratio=0.5: must be >= 1"):
        assert key in text, key
    assert len(err.value.problems) == 10


def test_lora_variant_combinations_that_cannot_work():
    problems = typed("peft.use_dora=true", "peft.init_lora_weights=pissa", "quant=none").peft.problems()
    assert any("peft.use_dora=true" in p and "pissa" in p for p in problems)
    problems = typed("peft.target_modules=[q_proj,lm_head]").peft.problems()
    assert any("lm_head" in p and "peft.modules_to_save" in p for p in problems)
    assert typed("peft=dora").peft.problems() == []
    assert typed("peft.init_lora_weights=pissa_niter_4").peft.problems() == []


def test_what_this_machine_cannot_run_is_refused_once_the_device_is_known():
    cfg = typed("train.optim=paged_adamw_8bit", "peft.init_lora_weights=loftq")  # device=auto: unknown until run
    with pytest.raises(ConfigError) as err:
        check_environment(cfg, "cpu")
    assert len(err.value.problems) == 2
    assert "train.optim='paged_adamw_8bit' needs CUDA" in str(err.value)
    assert "peft.init_lora_weights=loftq needs CUDA" in str(err.value)
    check_environment(cfg, "cuda")  # fine there
    with pytest.raises(ConfigError, match="train.use_liger_kernel=true needs CUDA"):
        check_environment(typed("train.use_liger_kernel=true"), "cpu")
    with pytest.raises(ConfigError, match="liger-kernel package is not installed"):  # not a dependency here
        check_environment(typed("train.use_liger_kernel=true"), "cuda")
    missing = "swanlab"  # not a dependency of this project, so not installed here
    with pytest.raises(ConfigError, match=f"train.report_to has '{missing}' but the {missing} package is not"):
        check_environment(typed(f"train.report_to=[tensorboard,{missing}]"), "cpu")


def test_8bit_optimizer_on_cpu_and_an_unknown_module_fail_together_before_anything_loads(tmp_path):
    res = run_cli("train", "train.optim=adamw_8bit", "peft.target_modules=[q_proj,attn]",
                  f"hydra.run.dir={tmp_path}", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "invalid config (2 problems)" in res.stderr
    assert "train.optim='adamw_8bit' needs CUDA" in res.stderr
    assert "peft.target_modules: 'attn' is not a linear layer of embedded:tiny" in res.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "config.yaml").exists()  # nothing written


def test_gradient_checkpointing_defaults_on_for_quantized_models_on_gpu():
    assert use_gradient_checkpointing(typed("quant=nf4"), "cuda") is True
    assert use_gradient_checkpointing(typed("quant=int8"), "cuda") is True
    assert use_gradient_checkpointing(typed("quant=none"), "cuda") is False
    assert use_gradient_checkpointing(typed("quant=nf4"), "cpu") is False
    assert use_gradient_checkpointing(typed("quant=nf4", "train.gradient_checkpointing=false"), "cuda") is False
    assert use_gradient_checkpointing(typed("quant=none", "train.gradient_checkpointing=true"), "cpu") is True


def test_compute_dtype_auto():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_train_keys_reach_trl_under_their_transformers_names(tmp_path):
    cfg = typed("train.max_steps=7", "train.learning_rate=1e-4", "train.lr_scheduler_type=linear",
                "train.warmup_steps=3", "train.gradient_accumulation_steps=2", "train.weight_decay=0.1",
                "train.max_grad_norm=0.5", "train.neftune_noise_alpha=5", "train.eval_steps=3", "train.seed=7",
                "train.gradient_checkpointing=true", "train.report_to=[tensorboard,mlflow]")
    args = sft_config(cfg, tmp_path, "cpu", has_eval=True)
    assert (args.max_steps, args.learning_rate, args.warmup_steps) == (7, 1e-4, 3)
    assert args.lr_scheduler_type.value == "linear"
    assert (args.gradient_accumulation_steps, args.weight_decay, args.max_grad_norm) == (2, 0.1, 0.5)
    assert (args.neftune_noise_alpha, args.eval_strategy.value, args.eval_steps, args.seed) == (5, "steps", 3, 7)
    assert args.activation_checkpointing and args.use_cpu and not args.bf16  # fp32 compute on CPU
    assert args.report_to == ["mlflow"]  # TensorBoard is our own callback writing to <run>/tensorboard
    assert args.output_dir == str(tmp_path / "checkpoints") and args.save_total_limit == 2


def test_eval_batches_as_many_packed_rows_as_training_unless_set(tmp_path):
    # padding-free packing joins a batch into one row: 8 packed rows would be one forward of 8 x max_length
    def eval_batch(*overrides):
        return sft_config(typed(*overrides), tmp_path, "cpu", has_eval=True).per_device_eval_batch_size

    assert eval_batch("train.per_device_train_batch_size=2") == 2
    assert eval_batch("train.per_device_eval_batch_size=3") == 3
    assert "per_device_eval_batch_size=0: must be a positive integer" in "\n".join(
        typed("train.per_device_eval_batch_size=0").train.problems())


def test_peft_variants_reach_peft():
    assert lora_config(typed("peft=dora").peft).use_dora
    rs = lora_config(typed("peft=rslora").peft)
    assert rs.use_rslora and (rs.r, rs.lora_alpha) == (64, 16)
    assert lora_config(typed("peft.init_lora_weights=gaussian").peft).init_lora_weights == "gaussian"
    assert lora_config(typed("peft.init_lora_weights=pissa_niter_4").peft).init_lora_weights == "pissa_niter_4"
    assert lora_config(typed("peft.init_lora_weights=loftq").peft).init_lora_weights is True  # replaced after
    lc = lora_config(typed("peft.modules_to_save=[embed_tokens,lm_head]", "peft.target_modules=[q_proj,v_proj]").peft)
    assert lc.modules_to_save == ["embed_tokens", "lm_head"] and set(lc.target_modules) == {"q_proj", "v_proj"}


def test_unknown_target_module_lists_the_ones_the_model_has():
    cfg = typed("quant=none", "peft.target_modules=[q_proj,qkv]", "peft.modules_to_save=[wte]")
    model = load_base_model(cfg.model, cfg.quant, "cpu")
    with pytest.raises(ConfigError) as err:
        check_target_modules(model, cfg.peft, cfg.model.name_or_path)
    text = str(err.value)
    assert len(err.value.problems) == 2
    assert "peft.target_modules: 'qkv' is not a linear layer of embedded:tiny" in text
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in text
    assert "peft.modules_to_save: 'wte'" in text and "embed_tokens" in text
    check_target_modules(model, typed("peft.target_modules=[q_proj,v_proj]").peft, "tiny")  # no error


@pytest.mark.parametrize("overrides, strategy", [
    ((), "random"),  # packed rows carry no padding to save
    (("train.packing=false",), "group_by_length"),
    (("train.packing=false", "train.train_sampling_strategy=random"), "random"),
    (("train.train_sampling_strategy=sequential",), "sequential"),
])
def test_sampling_strategy_groups_lengths_when_packing_is_off(overrides, strategy, tmp_path):
    args = sft_config(typed(*overrides), tmp_path, "cpu", has_eval=False)
    assert args.train_sampling_strategy == strategy
    assert args.use_liger_kernel is False


def test_unpacked_training_batches_rows_of_similar_length(tmp_path):
    """The sampler the Trainer really builds groups lengths: each micro-batch's rows are near in length."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from finetune.pipeline import prepare_data
    from finetune.train.trainer import build_trainer

    cfg = typed("device=cpu", "train.packing=false", "train.per_device_train_batch_size=4", "train.report_to=[]")
    tokenizer, splits = prepare_data(cfg, tmp_path / "data")
    trainer = build_trainer(cfg, splits, tokenizer, tmp_path / "run", "cpu")
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.sampler if loader.batch_sampler is None else loader.batch_sampler.sampler,
                      LengthGroupedSampler)
    lengths = [len(r) for r in trainer.train_dataset["input_ids"]]
    order = list(LengthGroupedSampler(4 * trainer.args.gradient_accumulation_steps, lengths=lengths))
    batches = [[lengths[i] for i in order[k:k + 4]] for k in range(0, len(order) - 3, 4)]
    padded = sum(4 * max(b) for b in batches)
    shuffled = [lengths[i] for i in torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]
    padded_random = sum(4 * max(shuffled[k:k + 4]) for k in range(0, 4 * len(batches), 4))
    assert padded < padded_random  # grouping computes fewer padded tokens than a random order
