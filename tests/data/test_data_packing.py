"""Packing (done by trl in the trainer): same loss packed as unpacked, and trl accepts our rows as they are."""
from __future__ import annotations

import pytest
import torch



def _tiny_model(vocab: int, attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation=attn)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows(tiny_tok, tmp_path_factory):
    from finetune.data import build_datasets
    from finetune.config.data import DataConfig, SourceConfig

    cfg = DataConfig(sources=[SourceConfig(path="demo:instruct_train.jsonl"),
                              SourceConfig(path="demo:structured_train.jsonl", format="structured", max_samples=4)])
    train = build_datasets(cfg, tiny_tok, cache_dir=tmp_path_factory.mktemp("c")).train.select(range(10))
    # what trl's dataset preparation does with an assistant_masks column
    return train.map(lambda r: {"labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(rows, tiny_tok, attn):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _tiny_model(len(tiny_tok), attn)
    pad = tiny_tok.pad_token_id
    plain = rows.select_columns(["input_ids", "labels"])
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(list(plain))
    packed_ds = pack_dataset(plain, seq_length=4096, strategy="bfd")
    assert len(packed_ds) == 1 and len(packed_ds[0]["seq_lengths"]) == len(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(list(packed_ds))
    assert "attention_mask" not in packed and packed["position_ids"].shape == packed["input_ids"].shape
    with torch.no_grad():
        # use_cache=False as trl's compute_loss sets it: with a cache, transformers skips packed-sequence detection
        loss_padded = model(**padded, use_cache=False).loss
        loss_packed = model(**packed, use_cache=False).loss
        loss_leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert abs(loss_leaky - loss_padded) > 1e-4  # sanity: without position ids, rows would attend to each other


def test_sft_trainer_accepts_our_pretokenized_rows(rows, tiny_tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    train = rows.remove_columns("labels")
    args = dict(output_dir=str(tmp_path), max_length=512, use_cpu=True, bf16=False, report_to=[], packing=True)
    trainer = SFTTrainer(model=_tiny_model(len(tiny_tok), "sdpa"), args=SFTConfig(**args), train_dataset=train,
                         processing_class=tiny_tok)
    prepared = trainer.train_dataset
    assert set(prepared.column_names) == {"input_ids", "labels", "seq_lengths"}
    labels = [t for r in prepared for t in r["labels"] if t != -100]
    assert len(labels) == sum(map(sum, train["assistant_masks"]))  # labels built from assistant_masks, none lost
    # trl 1.16 rejects assistant_only_loss=True here: our `messages` column is a JSON string, not a list of
    # turns, and trl only needs the flag to render masks itself. Labels come from assistant_masks anyway.
    with pytest.raises(ValueError, match="not conversational"):
        SFTTrainer(model=_tiny_model(len(tiny_tok), "sdpa"), processing_class=tiny_tok, train_dataset=train,
                   args=SFTConfig(**args, assistant_only_loss=True))
