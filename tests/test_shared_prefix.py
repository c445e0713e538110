"""Shared-prefix packing (finetune/train/shared_prefix.py with finetune.models.attention.sdpa_packed): a packed
row whose documents repeat prompt prefixes computes them once, with the same loss and gradients as the row
unshared, and the trainer uses it only where the attention can read it."""
import copy

import pytest
import torch

from finetune.models import attention
from finetune.train.shared_prefix import SharedPrefixCollator, plan_row, share_row

VOCAB = 300


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attention.NAME)
    return model


def _doc(prompt: list[int], reply: list[int]) -> dict:
    return {"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply}


def _documents():
    g = torch.Generator().manual_seed(1)

    def rand(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    system, schema_a, schema_b = rand(12), rand(10), rand(9)
    return [
        _doc(system + schema_a + rand(7), rand(6)),   # anchor of schema a
        _doc(system + schema_b + rand(5), rand(8)),   # shares the system prompt with the first
        _doc(rand(15), rand(4)),                      # nothing in common: an anchor
        _doc(system + schema_a + rand(9), rand(5)),   # shares system + schema a with the first
        _doc(system + schema_b + rand(3), rand(7)),   # shares system (+ schema b with the second)
        _doc(system[:5] + rand(11), rand(3)),         # 5 common tokens: under MIN_SHARED, an anchor
    ]


def _collate(docs):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    row = {"input_ids": sum((d["input_ids"] for d in docs), []), "labels": sum((d["labels"] for d in docs), []),
           "seq_lengths": [len(d["input_ids"]) for d in docs]}
    inner = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return inner([copy.deepcopy(row)]), SharedPrefixCollator(inner)([copy.deepcopy(row)])


def test_the_shared_row_is_shorter_and_keeps_every_label():
    plain, shared = _collate(_documents())
    assert "cu_seq_lens_q" in plain and "cu_seq_lens_q" not in shared  # varlen keys would describe the old row
    n_plain, n_shared = plain["input_ids"].shape[1], shared["input_ids"].shape[1]
    # from document 0: 1 and 4 its 12-token system prompt, 3 system + schema a (22 tokens). Document 4 would
    # share 21 with document 1, but a document that shares is no anchor itself (one level: plan_row).
    assert n_plain - n_shared == 12 + 22 + 12
    kept = sorted(t for t in plain["labels"][0].tolist() if t != -100)
    assert sorted(t for t in shared["labels"][0].tolist() if t != -100) == kept
    pos = shared["position_ids"][0].tolist()
    firsts = [pos[s] for s, _ in attention.document_bounds(shared["position_ids"])]
    assert firsts == [0, 12, 22, 12, 0, 0]  # anchor 0 with its followers 1, 3 and 4, then anchors 2 and 5


def test_shared_row_gives_the_same_loss_and_gradients_as_the_row_unshared():
    model = _model()
    plain, shared = _collate(_documents())
    shared_model = copy.deepcopy(model)
    loss = model(input_ids=plain["input_ids"], position_ids=plain["position_ids"], labels=plain["labels"],
                 use_cache=False).loss
    loss_shared = shared_model(input_ids=shared["input_ids"], position_ids=shared["position_ids"],
                               labels=shared["labels"], use_cache=False).loss
    torch.testing.assert_close(loss_shared, loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_shared.backward()
    for (name, p), q in zip(model.named_parameters(), shared_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_follower_attends_to_its_anchors_prefix_not_its_own_tokens():
    """Same loss only if the follower really reads the anchor's keys: with the anchor's prefix tokens changed
    after the cut (so the follower's own, removed copy would differ), the follower's loss must move."""
    model = _model()
    docs = _documents()[:2] + _documents()[3:4]
    _, shared = _collate(docs)
    ids, pos = shared["input_ids"].clone(), shared["position_ids"]
    labels = shared["labels"].clone()
    anchor_end = attention.document_bounds(pos)[0][1]
    labels[0, :anchor_end] = -100  # the followers' labels alone
    with torch.no_grad():
        base = model(input_ids=ids, position_ids=pos, labels=labels).loss
        ids[0, 3] = (ids[0, 3] + 1) % VOCAB  # a token of the anchor's shared system prompt
        moved = model(input_ids=ids, position_ids=pos, labels=labels).loss
        ids[0, anchor_end - 1] = (ids[0, anchor_end - 1] + 1) % VOCAB  # the anchor's last token: not shared
        same = model(input_ids=ids, position_ids=pos, labels=labels).loss
    assert abs(float(moved) - float(base)) > 1e-4
    torch.testing.assert_close(same, moved)


def test_the_cut_never_reaches_the_first_label():
    prompt = list(range(1, 21))
    docs = [_doc(prompt, [50, 51]), _doc(prompt, [60, 61, 62])]  # identical prompts: all but one token shared
    ids = sum((d["input_ids"] for d in docs), [])
    labels = sum((d["labels"] for d in docs), [])
    positions = list(range(22)) + list(range(23))
    _, order, shared = plan_row(ids, labels, positions)
    assert order == [0, 1] and shared == [0, 19]  # the 20th prompt token stays: it predicts the first label
    out_ids, out_labels, out_pos = share_row(ids, labels, positions)
    assert out_ids[22:] == [20, 60, 61, 62] and out_labels[22:] == [-100, 60, 61, 62] and out_pos[22] == 19


def test_nothing_shared_leaves_the_batch_as_trl_made_it():
    g = torch.Generator().manual_seed(3)
    docs = [_doc(torch.randint(1, VOCAB, (10,), generator=g).tolist(), [7, 8]) for _ in range(3)]
    plain, shared = _collate(docs)
    assert set(plain) == set(shared)
    for key in plain:
        assert torch.equal(torch.as_tensor(plain[key]), torch.as_tensor(shared[key])), key


def test_malformed_layout_is_a_clear_error():
    model = _model()
    ids = torch.randint(1, VOCAB, (1, 10))
    # the second document claims 8 shared tokens but the one before it has 4
    pos = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 11, 12, 13]])
    with pytest.raises(ValueError, match="no document before it"):
        model(input_ids=ids, position_ids=pos)


def test_trainer_wraps_the_collator_only_with_per_document_attention(tmp_path):
    from finetune.config import to_typed, validate
    from finetune.train.trainer import build_trainer
    from finetune.pipeline import prepare_data  # the data path finetune train takes
    from tests.test_config import compose_cfg

    overrides = ["experiment=tiny_demo", "quant=none", "device=cpu", "train.report_to=[]"]
    cfg = validate(to_typed(compose_cfg(overrides)))
    tokenizer, splits = prepare_data(cfg, tmp_path)
    trainer = build_trainer(cfg, splits, tokenizer, tmp_path, "cpu")
    assert isinstance(trainer.data_collator, SharedPrefixCollator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.data_collator.stats.tokens_after < trainer.data_collator.stats.tokens_before
    assert "cu_seq_lens_q" not in batch
    for off in ("train.share_prefixes=false", "train.per_document_attention=false"):
        cfg = validate(to_typed(compose_cfg([*overrides, off])))
        trainer = build_trainer(cfg, splits, tokenizer, tmp_path, "cpu")
        assert not isinstance(trainer.data_collator, SharedPrefixCollator), off


def test_training_with_and_without_sharing_logs_the_same_losses(tmp_path):
    """The whole training path (peft LoRA, trl's collator, the compact loss head, AdamW): 5 steps of the tiny
    demo with each layout. LoRA dropout off: its random masks are drawn per computed token, so with dropout the
    two runs follow different (equally likely) random paths."""
    from tests import test_golden_losses as golden

    losses, tokens = {}, {}
    for arm in ("true", "false"):
        (tmp_path / arm).mkdir()
        records = golden.run_demo(tmp_path / arm, [*golden.OVERRIDES, "peft.lora_dropout=0.0",
                                                   f"train.share_prefixes={arm}"])
        losses[arm] = [r["loss"] for r in records]
        tokens[arm] = [int(r["num_tokens"]) for r in records]
    assert len(losses["true"]) == golden.STEPS
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=0)
    assert tokens["true"][-1] < 0.8 * tokens["false"][-1]  # the demo rows share their prompt prefixes

