"""AR decoding: KV cache == full recompute, seeds, eos stopping, top-k/top-p, repetition penalty, ragged prompts."""

import pytest
import torch

from nanollada.model import ModelConfig, Transformer
from nanollada.sampling.ar import ar_generate, apply_repetition_penalty, top_k_filter, top_p_filter

V, EOS, PAD = 64, 2, 0


def tiny(seed: int = 0, init_std: float = 0.3) -> Transformer:
    """A random causal model with peaked logits (large init) so greedy argmax has clear margins."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=V, causal=True, max_seq_len=64,
                                               init_std=init_std)).eval()


def fixed_logits_hook(logits_fn):
    """Forward hook replacing the model's logits (B, T, V) with logits_fn(idx, logits)."""
    return lambda module, args, kwargs, out: logits_fn(args[0] if args else kwargs["idx"], out)


PROMPTS = [[5, 9, 11, 3], [7, 8], [12, 13, 14, 15, 16, 17], [20]]


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_kv_cache_matches_full_recompute_greedy(model):
    a = ar_generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_kv_cache=True)
    b = ar_generate(model, PROMPTS, max_new_tokens=12, temperature=0, use_kv_cache=False)
    assert a.generated == b.generated
    assert all(len(g) == 12 for g in a.generated)
    assert a.forwards == b.forwards == 12
    assert a.stopped_at_eos == [False] * 4
    assert 0 < a.first_token_seconds <= a.seconds


def test_ragged_batch_equals_each_prompt_alone(model):
    batch = ar_generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for p, g in zip(PROMPTS, batch.generated):
        assert ar_generate(model, [p], max_new_tokens=10, temperature=0).generated[0] == g


def test_tensor_prompt_and_greedy_matches_manual_argmax(model):
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = ar_generate(model, prompt, max_new_tokens=5, temperature=0)
    seq = prompt.clone()
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.generated == seq[:, 3:].tolist()


def test_seeded_sampling_reproducible_and_seed_dependent(model):
    def run(seed, cache=True):
        g = torch.Generator().manual_seed(seed)
        return ar_generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, generator=g,
                           use_kv_cache=cache).generated
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) == run(1, cache=False)  # same random stream, same logits (up to rounding)


def test_top_k_one_equals_greedy(model):
    greedy = ar_generate(model, PROMPTS, max_new_tokens=8, temperature=0).generated
    g = torch.Generator().manual_seed(0)
    assert ar_generate(model, PROMPTS, max_new_tokens=8, temperature=1.3, top_k=1, generator=g).generated == greedy


def test_eos_stops_rows_and_loop():
    m = tiny()
    calls = {"n": 0}

    def boost(idx, logits):  # row 0 produces eos at its 3rd new token, row 1 at its 5th
        calls["n"] += 1
        logits = logits.clone()
        if calls["n"] >= 3:
            logits[0, -1, EOS] = 1e4
        if calls["n"] >= 5:
            logits[1, -1, EOS] = 1e4
        return logits

    m.register_forward_hook(fixed_logits_hook(boost), with_kwargs=True)
    out = ar_generate(m, [[5, 6, 7], [8, 9]], max_new_tokens=20, temperature=0, eos_id=EOS)
    assert [len(g) for g in out.generated] == [2, 4]
    assert out.stopped_at_eos == [True, True]
    assert out.forwards == 5  # the loop ends once every row is done
    assert all(EOS not in g for g in out.generated)

    calls["n"] = 0
    out = ar_generate(m, [[5, 6, 7], [8, 9]], max_new_tokens=3, temperature=0, eos_id=EOS)
    assert [len(g) for g in out.generated] == [2, 3] and out.stopped_at_eos == [True, False]


def test_repetition_penalty_direction():
    m = tiny()
    base = torch.zeros(V)
    base[5], base[6] = 2.0, 1.5  # 5 is best, but it is in the prompt
    base[:5] = -1.0
    m.register_forward_hook(fixed_logits_hook(lambda idx, out: base.expand(out.shape).clone()), with_kwargs=True)
    assert ar_generate(m, [[5, 9]], max_new_tokens=1, temperature=0).generated == [[5]]
    assert ar_generate(m, [[5, 9]], max_new_tokens=1, temperature=0, repetition_penalty=2.0).generated == [[6]]
    # the penalty also covers generated tokens: 5 first, then 5 is seen (2.0 -> 1.0) so 6 (1.5) wins
    out = ar_generate(m, [[9]], max_new_tokens=3, temperature=0, repetition_penalty=2.0).generated[0]
    assert out[:2] == [5, 6]

    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).sum() == 1  # always at least one
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.79)).tolist() == [[False, True, False, True]]


def test_top_p_sampling_stays_in_nucleus():
    m = tiny()
    probs = torch.full((V,), 1e-4)
    probs[10], probs[11] = 0.6, 0.35
    logits = probs.log()
    m.register_forward_hook(fixed_logits_hook(lambda idx, out: logits.expand(out.shape).clone()), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    out = ar_generate(m, [[1]] * 8, max_new_tokens=20, temperature=1.0, top_p=0.9, generator=g).generated
    tokens = {t for row in out for t in row}
    assert tokens == {10, 11}


def test_validation_errors(model):
    with pytest.raises(ValueError):
        ar_generate(model, [[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError):
        ar_generate(model, [[]], max_new_tokens=2)
    bidir = Transformer(ModelConfig.from_preset("tiny", vocab_size=V, causal=False, max_seq_len=64))
    with pytest.raises(ValueError):
        ar_generate(bidir, [[1]], max_new_tokens=2)
    assert ar_generate(model, [[1], [2, 3]], max_new_tokens=0).generated == [[], []]
