"""generate(): batching, stopping at the end-of-turn token, greedy vs sampling, long outputs (item 4)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from finetune.data import render_prompt
from finetune.generate.generation import end_of_turn_id, generate, stop_token_ids

CONVS = [[{"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "Extract the name and the age from: Ada is 36 and lives in London."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}],
         [{"role": "user", "content": "ok"}]]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


class Script(LogitsProcessor):
    """Forces row r to emit scripts[r][k] at step k (then keeps repeating the last token)."""

    def __init__(self, scripts, width):
        self.scripts, self.width = scripts, width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        out = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self.scripts):
            out[row, script[min(step, len(script) - 1)]] = 0.0
        return out


def test_batched_length_sorted_generation_equals_one_by_one_in_input_order(model, tiny_tokenizer):
    prompts = [render_prompt(tiny_tokenizer, c) for c in CONVS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: batches are left-padded
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=16, batch_size=16)
    single = generate(model, tiny_tokenizer, prompts, max_new_tokens=16, batch_size=1)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.new_tokens == len(g.token_ids) > 0 for g in batched)


def test_generation_stops_at_the_end_of_turn_token(model, tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    prompts = [render_prompt(tiny_tokenizer, c) for c in CONVS[:2]]
    order = sorted(range(2), key=lambda i: len(prompts[i]))
    scripts = {0: [word, word, word, eot], 1: [word] * 40}  # row 0 ends its turn after 3 tokens; row 1 never

    def factory(indices):
        return LogitsProcessorList([Script([scripts[i] for i in indices], max(len(prompts[i]) for i in indices))])

    gens = generate(model, tiny_tokenizer, prompts, max_new_tokens=10, logits_processor_factory=factory)
    assert order == [0, 1]
    assert gens[0].stopped and gens[0].token_ids == [word] * 3 and gens[0].new_tokens == 3
    assert "<|im_end|>" not in gens[0].text and gens[0].text == tiny_tokenizer.decode([word] * 3)
    assert not gens[1].stopped and gens[1].new_tokens == 10  # cut by max_new_tokens


def test_end_of_turn_token_comes_from_the_chat_template(tiny_tokenizer):
    assert end_of_turn_id(tiny_tokenizer) == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    other = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    other.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    endoftext = other.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(other) == endoftext  # a template whose turns end with another token
    assert endoftext in stop_token_ids(other)


def test_sampling_follows_the_seed_and_greedy_ignores_it(model, tiny_tokenizer):
    from transformers import set_seed

    prompts = [render_prompt(tiny_tokenizer, c) for c in CONVS]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=1.0, top_k=0)

    def sample(seed):
        set_seed(seed)
        return [g.token_ids for g in generate(model, tiny_tokenizer, prompts, **kw)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    set_seed(3)
    greedy = generate(model, tiny_tokenizer, prompts, max_new_tokens=12)
    set_seed(4)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in generate(model, tiny_tokenizer, prompts,
                                                                           max_new_tokens=12)]


def test_max_new_tokens_is_capped_at_8192_by_the_config():
    from finetune.config import GenerateConfig

    assert GenerateConfig(max_new_tokens=8192).problems() == []
    assert GenerateConfig(max_new_tokens=8193).problems() == ["generate.max_new_tokens=8193: must be in 1..8192"]


@pytest.mark.slow
def test_8192_new_tokens_with_the_kv_cache(model, tiny_tokenizer):
    word = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    prompt = render_prompt(tiny_tokenizer, CONVS[0])
    gens = generate(model, tiny_tokenizer, [prompt], max_new_tokens=8192,
                    logits_processor_factory=lambda idx: LogitsProcessorList([Script([[word]], len(prompt))]))
    assert gens[0].new_tokens == 8192 and not gens[0].stopped


def test_rows_that_stop_leave_the_batch_and_every_reply_stays_the_same(tiny_dir, tiny_tokenizer, monkeypatch):
    """Greedy batches decode in calls of COMPACT_EVERY tokens, each without the rows that stopped before: the
    replies equal one call's, token for token, and later calls run fewer rows."""
    import finetune.generate.generation as gen

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    seed = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tiny model repeats one token; random weights write a different reply per row
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=seed) * 0.2)
    prompts = [render_prompt(tiny_tokenizer, c) for c in CONVS]
    free = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=16)
    # stop tokens that end row 0 after 2 tokens and row 2 after at most 6
    stops = [free[0].token_ids[2], free[2].token_ids[6]]
    monkeypatch.setattr(gen, "stop_token_ids", lambda *a, **k: stops)
    rows_per_call = []
    real = type(model).generate

    def spy(self, *args, **kwargs):
        rows_per_call.append(kwargs["input_ids"].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    monkeypatch.setattr(gen, "COMPACT_EVERY", 1000)
    whole = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=16)
    assert rows_per_call == [4]
    rows_per_call.clear()
    monkeypatch.setattr(gen, "COMPACT_EVERY", 2)
    compacted = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=16)
    assert [g.token_ids for g in compacted] == [g.token_ids for g in whole]
    assert [g.stopped for g in compacted] == [g.stopped for g in whole]
    assert whole[0].stopped and whole[0].new_tokens <= 2 and whole[2].stopped
    assert not all(g.stopped for g in whole)
    assert rows_per_call[0] == 4 and rows_per_call[-1] < 4 and len(rows_per_call) == 6
    assert sorted(rows_per_call, reverse=True) == rows_per_call


def test_an_adapter_model_continues_its_cache_under_the_current_argument_name(tiny_dir, tiny_tokenizer):
    """A PeftModel's forward still names the cache `past_key_values`; generate() must pass the name its base
    model takes (`cache` on transformers 5.24), or every decoding call of an unmerged adapter warned (the demo's
    merge-parity check printed it). The replies equal the merged model's."""
    import warnings

    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = [render_prompt(tiny_tokenizer, c) for c in CONVS]
    score = [(tiny_tokenizer("ok", add_special_tokens=False)["input_ids"], [1])] * len(prompts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        adapter = generate(peft_model, tiny_tokenizer, prompts, max_new_tokens=20, batch_size=16, score=score)
    merged = generate(peft_model.merge_and_unload(), tiny_tokenizer, prompts, max_new_tokens=20, batch_size=16)
    assert [g.token_ids for g in adapter] == [g.token_ids for g in merged]
