"""The compact loss head (finetune.train.loss_head) against trl's fused head: same loss, gradients, entropy and
token accuracy, on label positions only; chunked and unchunked; with autocast."""
import copy

import pytest
import torch


def _models():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from finetune.train.loss_head import compact_lm_head

    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    mine = copy.deepcopy(base)
    out = []
    for model, compact in ((base, False), (mine, True)):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if compact:
            compact_lm_head(model, model.forward)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        out.append(peft_model)
    return out


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(0, 500, (1, 40))
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt
    labels[:, 25:30] = -100  # a second document's prompt
    return dict(input_ids=ids, labels=labels, position_ids=torch.cat([torch.arange(25), torch.arange(15)])[None])


@pytest.mark.parametrize("chunk", [1024, 7])  # one chunk, and several
def test_compact_head_matches_trl_fused_head(monkeypatch, chunk):
    from finetune.train import loss_head

    monkeypatch.setattr(loss_head, "CHUNK_TOKENS", chunk)
    trl_model, mine = _models()
    batch = _batch()
    ref = trl_model(**batch, fused_lm_head=True, use_cache=False)
    out = mine(**batch, fused_lm_head=True, use_cache=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.is_top1.bool(), ref.is_top1.bool())
    assert torch.equal(out.label_mask, ref.label_mask)
    ref.loss.backward()
    out.loss.backward()
    grads = [(n, p.grad) for n, p in trl_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    for (name, g_ref), p in zip(grads, [p for p in mine.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_compact_head_under_bf16_autocast_is_close_to_fp32():
    trl_model, mine = _models()
    batch = _batch()
    ref = trl_model(**batch, fused_lm_head=True, use_cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mine(**batch, fused_lm_head=True, use_cache=False)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) < 0.02 * ref.loss.item()


def test_no_label_gives_a_zero_loss_that_backpropagates():
    _, mine = _models()
    batch = _batch()
    batch["labels"][:] = -100
    out = mine(**batch, fused_lm_head=True, use_cache=False)
    assert out.loss.item() == 0.0
    out.loss.backward()  # no "does not require grad" error


def test_without_fused_flag_the_model_returns_logits():
    _, mine = _models()
    batch = _batch()
    out = mine(input_ids=batch["input_ids"])
    assert out.logits.shape == (1, 40, 500)


def test_models_with_logit_scaling_keep_trl_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.train.loss_head import supported

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    assert supported(LlamaForCausalLM(cfg)) is None
    cfg.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in supported(LlamaForCausalLM(cfg))


def test_chunks_bound_the_fp32_logits_whatever_the_vocabulary(monkeypatch):
    from finetune.train import loss_head

    for vocab in (500, 49152, 151936):
        assert loss_head.chunk_tokens(vocab) * vocab * 4 <= max(loss_head.CHUNK_BYTES, 32 * vocab * 4)
    seen = []
    real = loss_head._chunk_terms
    monkeypatch.setattr(loss_head, "_chunk_terms", lambda w, b, h, y: (seen.append(h.shape[0]), real(w, b, h, y))[1])
    weight = torch.randn(151936, 8)
    hidden = torch.randn(300, 8, requires_grad=True)
    picked, _, _ = loss_head._label_terms(weight, None, hidden, torch.randint(0, 151936, (300,)))
    picked.sum().backward()
    assert max(seen) == loss_head.chunk_tokens(151936) < 300 and sum(seen[:3]) >= 300  # chunked, all rows seen
    assert hidden.grad is not None and picked.shape == (300,)
