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


def test_cpu_bf16_training_computes_packed_attention_in_fp32_when_that_measured_faster(monkeypatch):
    import types

    lens, heads, kv, dim = [37, 45, 29], 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(1, h, sum(lens), dim, generator=gen) for h in (heads, kv, kv))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv)
    q32, k32, v32 = (x.bfloat16().float() for x in (q32, k32, v32))  # the inputs exact in bf16
    want, _ = attention.sdpa_packed_forward(module, q32, k32, v32, None, position_ids=pos)  # fp32 throughout
    asked, err = [], {}
    for fp32 in (False, True):
        monkeypatch.setattr(attention, "fp32_backward_faster", lambda *a, fp32=fp32: asked.append(a) or fp32)
        q, k, v = (x.bfloat16().requires_grad_() for x in (q32, k32, v32))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate runs the training forward
            out, _ = attention.sdpa_packed_forward(module, q, k, v, None, position_ids=pos)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in (q, k, v))
        err[fp32] = ((out.float() - want).abs() / want.abs().clamp_min(1e-3)).max().item()
    # in fp32 only the output's rounding to bf16 is left; were autocast let in, it would compute in bf16 again
    assert err[True] <= 2 ** -7 < err[False]
    assert asked[0] == (torch.bfloat16, heads, kv, dim, (29, 37, 45))
    asked.clear()
    with torch.no_grad():  # generation and scoring keep the compute dtype: nothing to measure
        attention.sdpa_packed_forward(module, q32.bfloat16(), k32.bfloat16(), v32.bfloat16(), None, position_ids=pos)
    assert asked == []


def test_the_fp32_choice_is_measured_once_per_mean_length_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(attention, "_CHOICES", {})
    probes = []

    def probe(dtype, heads, kv, dim, lengths):
        probes.append(lengths)
        return (10.0, 5.0) if sum(lengths) / len(lengths) < 256 else (10.0, 9.5)

    monkeypatch.setattr(attention, "probe_ms", probe)
    assert attention.fp32_backward_faster(torch.bfloat16, 9, 3, 64, (140, 150, 160)) is True
    assert attention.fp32_backward_faster(torch.bfloat16, 9, 3, 64, (135, 150, 170)) is True  # same bucket
    assert attention.fp32_backward_faster(torch.bfloat16, 9, 3, 64, (300, 310)) is False  # a 9.5 vs 10 tie
    assert probes == [(140, 150, 160), (300, 310)]
    # a later process on this CPU takes the stored choices instead of timing again (runs stay reproducible)
    monkeypatch.setattr(attention, "_CHOICES", {})
    assert attention.fp32_backward_faster(torch.bfloat16, 9, 3, 64, (150, 150, 150)) is True
    assert attention.fp32_backward_faster(torch.bfloat16, 9, 3, 64, (290, 320)) is False
    assert len(probes) == 2 and len(list((tmp_path / "cpu").glob("attention-*.json"))) == 2
    assert attention.probe_lengths([(0, 50), (50, 60), (60, 200), (200, 230), (230, 300)]) == (10, 30, 50, 140)
    assert attention.choose_fp32(10.0, 9.0) is True and attention.choose_fp32(10.0, 9.2) is False


def test_probe_times_both_ways_on_split_documents():
    native, fp32 = attention.probe_ms(torch.bfloat16, 4, 2, 16, (9, 13))
    assert 0 < native < 1e4 and 0 < fp32 < 1e4
