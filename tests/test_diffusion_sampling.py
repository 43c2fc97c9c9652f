"""Masked-diffusion sampling: strategies, semi-AR blocks, eos stopping, reproducibility, budget, prefix cache."""

import io
import math

import pytest
import torch
from torch import nn

from nanollada.model import ModelConfig, Transformer
from nanollada.sampling.diffusion import (
    ConfidenceThreshold,
    LowConfidence,
    RandomRemask,
    ThresholdTopKBudget,
    add_gumbel_noise,
    diffusion_generate,
    get_num_transfer_tokens,
    print_trace,
    trace_to_html,
)

V, MASK, EOS = 64, 63, 2
GEN, BLOCK = 32, 8
INF = float("inf")


def tiny(n_layers=2, double=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, causal=False, max_seq_len=64, n_layers=n_layers)
    model = Transformer(cfg).eval()
    return model.double() if double else model


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    return torch.randint(3, MASK, (2, 6))


def strategies():
    return [LowConfidence(4), RandomRemask(4), ConfidenceThreshold(0.9), ThresholdTopKBudget(0.9, top_k=3, budget=12)]


IDS = ["low_confidence", "random", "threshold", "threshold_topk_budget"]


def gen(model, prompt, strategy, **kw):
    kw = {"gen_length": GEN, "block_length": BLOCK, "mask_id": MASK, **kw}
    return diffusion_generate(model, prompt, strategy=strategy, **kw)


def check_trace(trace, mask_id=MASK, block=BLOCK, eos_fill=False):
    """Every step commits >= 1 position in each row still working on the current block; a position of block j+1 is
    never committed while block j has a mask; committed tokens never change (unless eos padding rewrites them)."""
    prev = torch.full_like(trace[0], mask_id)
    for step, cur in enumerate(trace):
        for row in cur:
            masked = (row == mask_id).nonzero()
            if len(masked):
                first_block = int(masked[0]) // block
                assert (row[(first_block + 1) * block:] == mask_id).all(), f"step {step}: a later block is ahead"
        first_masked_block = torch.tensor([int((r == mask_id).nonzero()[0]) // block for r in prev])
        working = first_masked_block == first_masked_block.min()
        newly = ((prev == mask_id) & (cur != mask_id)).sum(1)
        assert (newly[working] >= 1).all(), f"step {step}: a row committed nothing"
        if not eos_fill:
            done = prev != mask_id
            assert torch.equal(cur[done], prev[done]), f"step {step}: a committed token changed"
        prev = cur


@pytest.mark.parametrize("strategy", strategies(), ids=IDS)
def test_fills_canvas_in_block_order(model, prompt, strategy):
    out = gen(model, prompt, strategy, temperature=0.7, generator=torch.Generator().manual_seed(0), record_trace=True)
    assert out.tokens.shape == (2, prompt.shape[1] + GEN)
    assert torch.equal(out.generated, out.tokens[:, prompt.shape[1]:])
    assert torch.equal(out.tokens[:, : prompt.shape[1]], prompt)
    assert not (out.tokens == MASK).any()
    assert len(out.trace) == out.forwards == sum(out.steps_per_block) and len(out.steps_per_block) == GEN // BLOCK
    assert torch.equal(out.trace[-1], out.generated) and out.committed == out.generated.numel()
    assert 0 < out.first_round_seconds <= out.seconds
    check_trace(out.trace)


@pytest.mark.parametrize("strategy", strategies(), ids=IDS)
def test_reproducible_under_seed(model, prompt, strategy):
    run = lambda seed: gen(model, prompt, strategy, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.tokens, b.tokens) and a.forwards == b.forwards
    assert not torch.equal(a.tokens, c.tokens)


class ScriptedModel(nn.Module):
    """Predicts targets[row, i] at generated position i with a confidence that falls with i (left-to-right)."""

    def __init__(self, prompt_len, targets):
        super().__init__()
        self.cfg = ModelConfig.from_preset("tiny", vocab_size=V, causal=False, max_seq_len=64)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len, self.targets = prompt_len, targets

    def forward(self, idx, attn_mask=None, kv_cache=None, cache_pos=0):
        B, T = idx.shape
        i = (torch.arange(T) + cache_pos - self.prompt_len).clamp(0, self.targets.shape[1] - 1)
        logits = torch.zeros(B, T, V)
        logits.scatter_(2, self.targets[:, i][..., None], (8.0 - 0.2 * i.float()).expand(B, T)[..., None])
        return logits


@pytest.mark.parametrize("strategy", strategies(), ids=IDS)
def test_stops_at_eos(prompt, strategy):
    answer = [10, 11, 12, 13, 14, EOS, 7, 7]  # a committed non-eos token after the eos is still reported as eos
    targets = torch.tensor([answer + [7] * (GEN - len(answer))] * 2)
    model = ScriptedModel(prompt.shape[1], targets)
    full = gen(model, prompt, strategy, generator=torch.Generator().manual_seed(0))
    out = gen(model, prompt, strategy, eos_id=EOS, generator=torch.Generator().manual_seed(0), record_trace=True)
    assert torch.equal(full.generated, targets)  # without eos_id nothing is cut
    assert out.forwards < full.forwards and out.forwards <= 4 and out.steps_per_block[1:] == [0, 0, 0]
    expected = torch.tensor([answer[:5] + [EOS] * (GEN - 5)] * 2)
    assert torch.equal(out.generated, expected)
    check_trace(out.trace, eos_fill=True)


def test_eos_pads_only_rows_that_ended(prompt):
    targets = torch.tensor([[10, 11, EOS] + [7] * (GEN - 3), [10, 11, 12] + [7] * (GEN - 3)])
    out = gen(ScriptedModel(prompt.shape[1], targets), prompt, LowConfidence(4), eos_id=EOS)
    assert out.forwards == 4 * GEN // BLOCK  # row 1 never ends, so every block is decoded
    assert torch.equal(out.generated[0], torch.tensor([10, 11] + [EOS] * (GEN - 2)))
    assert torch.equal(out.generated[1], targets[1])


@pytest.mark.parametrize("steps, per_step", [(3, [3, 3, 2]), (4, [2, 2, 2, 2]), (5, [2, 2, 2, 1, 1])])
def test_low_confidence_schedule(model, prompt, steps, per_step):
    out = gen(model, prompt, LowConfidence(steps), gen_length=24, record_trace=True)
    assert out.forwards == steps * 3 and out.steps_per_block == [steps] * 3
    prev = torch.full_like(out.trace[0], MASK)
    counts = []
    for cur in out.trace:
        counts.append(((prev == MASK) & (cur != MASK)).sum(1))
        prev = cur
    expected = get_num_transfer_tokens(torch.ones(2, BLOCK, dtype=torch.bool), steps).repeat(1, 3)
    assert torch.equal(torch.stack(counts, 1), expected) and expected[0, :steps].tolist() == per_step
    assert gen(model, prompt, LowConfidence(10)).steps_per_block == [BLOCK] * 4  # empty steps are skipped


def test_num_transfer_tokens_matches_llada():
    torch.manual_seed(0)
    mask_index = torch.rand(5, 17) < torch.rand(5, 1)
    for steps in (1, 3, 4, 20):
        n = mask_index.sum(dim=1, keepdim=True)  # LLaDA generate.py, verbatim in spirit
        ref = torch.zeros(5, steps, dtype=torch.int64) + n // steps
        for i in range(5):
            ref[i, : n[i] % steps] += 1
        assert torch.equal(get_num_transfer_tokens(mask_index, steps), ref)


def test_commit_rules():
    conf = torch.tensor([[0.95, 0.5, 0.92, -INF, 0.1], [-INF] * 5])
    n = torch.tensor([4, 0])
    as_list = lambda m: m.int().tolist()
    assert as_list(ConfidenceThreshold(0.9).commit(conf, n, 0, None)) == [[1, 0, 1, 0, 0], [0] * 5]
    assert as_list(ConfidenceThreshold(0.99).commit(conf, n, 0, None)) == [[1, 0, 0, 0, 0], [0] * 5]  # at least one
    assert as_list(ThresholdTopKBudget(0.9, top_k=1).commit(conf, n, 0, None)) == [[1, 0, 0, 0, 0], [0] * 5]
    assert as_list(ThresholdTopKBudget(0.0, top_k=3).commit(conf, n, 0, None)) == [[1, 1, 1, 0, 0], [0] * 5]
    assert as_list(ThresholdTopKBudget(0.99, top_k=1).commit(conf, n, 0, 2)) == [[1, 0, 1, 0, 0], [0] * 5]  # budget
    assert as_list(ThresholdTopKBudget(0.99, top_k=1).commit(conf, n, 0, 1)) == [[1, 1, 1, 0, 1], [0] * 5]
    assert as_list(LowConfidence(4).commit(conf, n, 1, 3)) == [[1, 0, 1, 0, 0], [0] * 5]
    assert as_list(LowConfidence(4).commit(conf, n, 3, 1)) == [[1, 1, 1, 0, 1], [0] * 5]


def test_budget_and_top_k(model, prompt):
    free = gen(model, prompt, ThresholdTopKBudget(0.99, top_k=4))  # a random model is never confident: 1 per step
    assert free.forwards == GEN
    for budget, split in ((4, [1, 1, 1, 1]), (10, [3, 3, 2, 2]), (13, [4, 3, 3, 3])):  # fair share per block
        out = gen(model, prompt, ThresholdTopKBudget(0.99, top_k=4, budget=budget))
        assert out.forwards == budget and out.steps_per_block == split and not (out.tokens == MASK).any()
    capped = gen(model, prompt, ThresholdTopKBudget(0.0, top_k=3), record_trace=True)  # all confident: top_k rules
    assert capped.steps_per_block == [math.ceil(BLOCK / 3)] * 4
    with pytest.raises(ValueError, match="budget"):
        gen(model, prompt, ThresholdTopKBudget(0.9, top_k=2, budget=3))


@pytest.mark.parametrize("strategy", [LowConfidence(4), ConfidenceThreshold(0.9)], ids=["low_confidence", "threshold"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prefix_cache_matches_uncached(prompt, strategy, temperature):
    # Exact for one layer: the cached prefix keys depend only on the prefix tokens, recomputed at each block start.
    model = tiny(n_layers=1, double=True)
    run = lambda **kw: gen(model, prompt, strategy, temperature=temperature,
                           generator=torch.Generator().manual_seed(0), **kw)
    ref, cached, full = run(attend_future_blocks=False), run(use_prefix_cache=True), run()
    assert torch.equal(cached.tokens, ref.tokens) and cached.forwards == ref.forwards
    assert cached.forward_tokens < ref.forward_tokens < full.forward_tokens
    assert cached.forward_tokens < 0.6 * ref.forward_tokens


def test_prefix_cache_exact_when_each_block_is_one_forward(prompt):
    # With more layers the cache is approximate within a block, but a block decoded in one step only uses the exact
    # block-start forward.
    model = tiny(n_layers=2, double=True)
    ref = gen(model, prompt, LowConfidence(1), attend_future_blocks=False)
    cached = gen(model, prompt, LowConfidence(1), use_prefix_cache=True)
    assert torch.equal(cached.tokens, ref.tokens) and cached.forwards == 4
    with pytest.raises(ValueError, match="attend_future_blocks"):
        gen(model, prompt, LowConfidence(1), use_prefix_cache=True, attend_future_blocks=True)


def test_left_padding_is_ignored(prompt):
    model = tiny(double=True)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), prompt], 1)
    prompt_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), torch.ones_like(prompt, dtype=torch.bool)], 1)
    ref = gen(model, prompt, LowConfidence(4))
    out = gen(model, padded, LowConfidence(4), prompt_mask=prompt_mask)
    assert torch.equal(out.generated, ref.generated)
    assert not torch.equal(gen(model, padded, LowConfidence(4)).generated, ref.generated)  # the mask matters


def test_invalid_lengths(model, prompt):
    with pytest.raises(ValueError, match="multiple"):
        gen(model, prompt, LowConfidence(2), gen_length=30, block_length=8)
    with pytest.raises(ValueError):
        gen(model, prompt[0], LowConfidence(2))


def test_gumbel_noise():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)
    assert add_gumbel_noise(logits, 0.0) is logits
    g = torch.Generator().manual_seed(0)
    noisy = add_gumbel_noise(logits, 1.0, g)
    assert noisy.dtype == torch.float64
    assert abs(noisy.argmax(-1).float().mean().item() - 0.75) < 0.02  # samples softmax(logits)
    hot = add_gumbel_noise(logits, 2.0, torch.Generator().manual_seed(0)).argmax(-1).float().mean().item()
    assert abs(hot - math.sqrt(3) / (1 + math.sqrt(3))) < 0.02  # softmax(logits / 2)


def test_trace_rendering(model, prompt, tmp_path):
    out = gen(model, prompt, LowConfidence(2), gen_length=16, record_trace=True)
    buf = io.StringIO()
    print_trace(out.trace, mask_id=MASK, file=buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(out.trace) == 4 and "░" in lines[0] and "░" not in lines[-1]
    path = tmp_path / "trace.html"
    trace_to_html(out.trace, str(path), decode=lambda ids: f"<{ids[0]}>", mask_id=MASK)
    page = path.read_text()
    assert page.startswith("<!doctype html>") and 'max="3"' in page and 'class=\\"m\\"' in page
    assert "&lt;" in page and f"&lt;{int(out.generated[0, 0])}&gt;" in page  # escaped decoded tokens
