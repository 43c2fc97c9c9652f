"""Answers that end before they start (issue 16 item 4): LLaDA's min-length eos ban and eos-after-text rule, and
<|im_end|> ending a row like eos, in both diffusion decoders."""

import pytest
import torch

from nanollada.model import ModelConfig
from nanollada.sampling.block_diffusion import block_diffusion_generate
from nanollada.sampling.diffusion import ConfidenceThreshold, diffusion_generate

V, MASK, EOS, IM_END = 32, 31, 2, 5


class EosEager(torch.nn.Module):
    """Proposes eos everywhere with probability ~0.99, else a word (7) -- an SFT model drowned in eos padding."""

    cfg = ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64, causal=False)

    def __init__(self, stop=EOS, unsure_first=False):
        super().__init__()
        self.w, self.stop, self.unsure_first = torch.nn.Parameter(torch.zeros(1)), stop, unsure_first

    def forward(self, ids, attn_mask=None, kv_cache=None, cache_pos=0, **_):
        out = torch.full((*ids.shape, V), -10.0)
        out[..., self.stop] = 6.0
        out[..., 7] = 1.0
        if self.unsure_first:  # the first two answer positions (canvas 3, 4): a word, p ~ 0.6 < the threshold
            pos = cache_pos + torch.arange(ids.shape[1])
            first = (pos >= 3) & (pos < 5)
            out[:, first, self.stop], out[:, first, 7] = 0.5, 1.0
        return out


def run(kind, **kw):
    prompt = torch.tensor([[1, 9, 9]])
    model = EosEager(kw.pop("stop", EOS), kw.pop("unsure_first", False))
    if kind == "masked":
        return diffusion_generate(model, prompt, gen_length=16, block_length=8,
                                  strategy=ConfidenceThreshold(0.9), mask_id=MASK, eos_id=EOS, **kw)
    return block_diffusion_generate(model, prompt, gen_length=13, block_size=8,
                                    strategy=ConfidenceThreshold(0.9), mask_id=MASK, eos_id=EOS, **kw)


@pytest.mark.parametrize("kind", ["masked", "block"])
def test_stop_rules(kind):
    plain = run(kind)
    assert (plain.generated[0] == EOS).all() and plain.forwards == 1  # an empty answer at once
    banned = run(kind, min_new_tokens=4)
    assert banned.generated[0, :4].tolist() == [7] * 4 and (banned.generated[0, 4:] == EOS).all()
    # eos candidates wait while an earlier answer position is masked
    eager = run(kind, unsure_first=True, record_trace=True)
    deferred = run(kind, unsure_first=True, record_trace=True, eos_after_text=True)
    assert (eager.trace[0][0, 2:5] == EOS).all() and (eager.trace[0][0, :2] == MASK).all()  # eos first, text later
    for canvas in deferred.trace:  # never an eos with a mask before it
        row = canvas[0].tolist()
        first_eos = row.index(EOS) if EOS in row else len(row)
        assert MASK not in row[:first_eos] or EOS not in row
    assert deferred.generated[0, :2].tolist() == [7, 7] == eager.generated[0, :2].tolist()
    im_end = run(kind, stop=IM_END, end_ids=(IM_END,))
    assert (im_end.generated[0] == EOS).all() and im_end.forwards == 1  # ended at once, the rest is eos
    no_end = run(kind, stop=IM_END)  # without end_ids, <|im_end|> does not end the row
    assert no_end.forwards > 1
