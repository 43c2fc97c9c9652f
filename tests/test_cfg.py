"""Classifier-free guidance in both diffusion decoders: w = 0 is today's decoding, w > 0 changes the tokens, the
unconditional rows never see the prompt, guidance works with the caches; prompt dropout masks SFT prompts."""

import pytest
import torch

from nanollada.model import ModelConfig, Transformer
from nanollada.sampling.block_diffusion import block_diffusion_generate
from nanollada.sampling.diffusion import ConfidenceThreshold, LowConfidence, diffusion_generate

V, MASK = 64, 63


class Recording(torch.nn.Module):
    """Wraps a Transformer and records every input batch."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                             max_seq_len=96, causal=False)).eval()
        self.cfg, self.inputs = self.inner.cfg, []

    def forward(self, ids, **kw):
        self.inputs.append(ids.clone())
        return self.inner(ids, **kw)


def decode(kind, model, prompt, w, cache):
    if kind == "masked":
        return diffusion_generate(model, prompt, gen_length=16, block_length=8, strategy=LowConfidence(4),
                                  mask_id=MASK, use_prefix_cache=cache, cfg_scale=w)
    return block_diffusion_generate(model, prompt, gen_length=19, block_size=8, strategy=ConfidenceThreshold(0.05),
                                    mask_id=MASK, use_cache=cache, cfg_scale=w)


@pytest.mark.parametrize("kind", ["masked", "block"])
@pytest.mark.parametrize("cache", [False, True])
def test_guidance(kind, cache):
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(1))
    m = Recording()
    base = decode(kind, m, prompt, 0.0, cache)
    assert all(x.shape[0] == 2 for x in m.inputs)  # w = 0: one plain forward per step, no extra rows
    m.inputs.clear()
    guided = decode(kind, m, prompt, 2.0, cache)
    assert not torch.equal(base.tokens, guided.tokens)  # guidance changes the answer
    assert torch.equal(guided.tokens[:, :5], prompt)
    for x in m.inputs:  # conditional rows first, then the unconditional ones: their prompt part is all masks
        assert x.shape[0] == 4
        cond, un = x[:2], x[2:]
        if x.shape[1] >= 5 and torch.equal(cond[:, :5], prompt):
            assert (un[:, :5] == MASK).all()
            assert torch.equal(un[:, 5:], cond[:, 5:])
    assert any(x.shape[1] >= 5 for x in m.inputs)
    # the cache is per row: cached and uncached guided decoding agree where the cache is exact (block diffusion)
    if kind == "block":
        other = decode(kind, Recording(), prompt, 2.0, not cache)
        assert torch.equal(other.tokens, guided.tokens)


def test_guidance_zero_matches_the_unguided_call_exactly():
    prompt = torch.randint(0, MASK, (1, 7), generator=torch.Generator().manual_seed(2))
    a = diffusion_generate(Recording(), prompt, gen_length=16, block_length=8, strategy=LowConfidence(8), mask_id=MASK)
    b = diffusion_generate(Recording(), prompt, gen_length=16, block_length=8, strategy=LowConfidence(8), mask_id=MASK,
                           cfg_scale=0.0)
    assert torch.equal(a.tokens, b.tokens) and a.forwards == b.forwards


def test_prompt_dropout_masks_whole_prompts_only():
    from nanollada.noise import drop_prompts
    ids = torch.arange(1, 13).view(2, 6).repeat(200, 1)  # 400 rows: prompt 3 tokens, answer 2, padding 1
    eligible = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool).expand_as(ids)
    real = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool).expand_as(ids)
    out = drop_prompts(ids, eligible, real, 0.3, MASK, torch.Generator().manual_seed(0))
    dropped = (out[:, :3] == MASK).all(1)
    assert torch.equal((out[:, :3] == MASK).any(1), dropped)  # a prompt is masked whole or not at all
    assert torch.equal(out[:, 3:], ids[:, 3:])  # answers and padding untouched
    assert 0.22 < dropped.float().mean() < 0.38  # ~ the rate (400 rows)
    assert torch.equal(drop_prompts(ids, eligible, real, 0.0, MASK), ids)
