"""Per-document attention on packed rows (finetune.models.attention): the same outputs and gradients as sdpa
with transformers' block-diagonal packed mask, and plain sdpa for everything that is not a packed row."""
import copy

import torch

from finetune.models import attention


def _pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    packed = LlamaForCausalLM(copy.deepcopy(cfg))  # a config of its own: the attention choice lives there
    packed.load_state_dict(ref.state_dict())
    packed.set_attn_implementation(attention.NAME)
    assert ref.config._attn_implementation == "sdpa"
    return ref, packed


def test_document_bounds():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert attention.document_bounds(pos) == [(0, 3), (3, 5), (5, 9)]
    assert attention.document_bounds(torch.arange(6)[None]) is None  # one document: nothing to split
    assert attention.document_bounds(torch.zeros(2, 5, dtype=torch.long)) is None  # a padded batch
    assert attention.document_bounds(None) is None


def test_packed_row_matches_sdpa_block_mask_and_separate_documents():
    ref, packed = _pair()
    lens = [7, 12, 5, 9]
    ids = torch.randint(0, 300, (1, sum(lens)))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out_ref = ref(input_ids=ids, position_ids=pos, use_cache=False, labels=ids)
    out = packed(input_ids=ids, position_ids=pos, use_cache=False, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    # and each document alone, unpacked, gives the same logits: nothing crosses a boundary
    start = 0
    for n in lens:
        alone = ref(input_ids=ids[:, start:start + n], use_cache=False).logits
        torch.testing.assert_close(out.logits[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), packed.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_not_packed_is_plain_sdpa_with_its_mask():
    ref, packed = _pair()
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row, as in batched generation
    torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits)
    gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(packed.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), gen_ref)


def test_trainer_switches_to_per_document_attention_only_for_packed_sdpa():
    from finetune.config import to_typed, validate
    from finetune.train.trainer import use_packed_attention
    from tests.test_config import compose_cfg

    tiny_cfg = validate(to_typed(compose_cfg(["experiment=tiny_demo"])))
    assert tiny_cfg.train.packing and tiny_cfg.train.per_document_attention  # the defaults

    ref, _ = _pair()
    assert use_packed_attention(ref, tiny_cfg) is True
    assert ref.config._attn_implementation == attention.NAME
    eager, _ = _pair()
    eager.set_attn_implementation("eager")
    assert use_packed_attention(eager, tiny_cfg) is False  # asked for on purpose: left alone
    tiny_cfg.train.per_document_attention = False
    plain, _ = _pair()
    assert use_packed_attention(plain, tiny_cfg) is False and plain.config._attn_implementation == "sdpa"


def test_bounds_from_trl_cumulative_lengths_agree_with_position_ids():
    lens = [3, 2, 4]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert attention.document_bounds(pos, cu) == attention.document_bounds(pos) == [(0, 3), (3, 5), (5, 9)]
    # lengths that do not cover the row are not trusted: the position ids decide
    assert attention.document_bounds(pos, torch.tensor([0, 3, 5])) == [(0, 3), (3, 5), (5, 9)]
