"""The shared backbone: causal vs bidirectional attention, KV cache, presets, document masks, weight matching."""

import pytest
import torch

from nanollada.model import (
    KVCache,
    ModelConfig,
    Transformer,
    document_attention_mask,
    load_matching_weights,
)

V = 64


def make(causal=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, causal=causal, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def causal_model():
    return make(causal=True)


@pytest.fixture(scope="module")
def bidir_model():
    return make(causal=False)


def ids(B=2, T=16, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_causal_logits_ignore_the_future(causal_model):
    x = ids()
    y = x.clone()
    i = 7
    y[:, i + 1:] = (y[:, i + 1:] + 1 + torch.arange(y.shape[1] - i - 1)) % V  # every later token changes
    a, b = causal_model(x), causal_model(y)
    assert a.shape == (2, 16, V)
    torch.testing.assert_close(a[:, : i + 1], b[:, : i + 1], rtol=0, atol=1e-5)
    assert (a[:, i + 1:] - b[:, i + 1:]).abs().amax() > 1e-3


@torch.no_grad()
def test_bidirectional_logits_see_the_future(bidir_model):
    x = ids()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V  # only the last token changes
    a, b = bidir_model(x), bidir_model(y)
    assert ((a[:, 0] - b[:, 0]).abs().amax(-1) > 1e-4).all()  # the first position sees it


@torch.no_grad()
def test_causal_and_bidirectional_share_parameters():
    assert make(causal=True).state_dict().keys() == make(causal=False).state_dict().keys()
    a, b = make(causal=True, n_layers=1), make(causal=False, n_layers=1)
    b.load_state_dict(a.state_dict())
    x = ids(T=8)
    # One layer, same weights: the last position sees everything in both, so it agrees; earlier positions differ.
    torch.testing.assert_close(a(x)[:, -1], b(x)[:, -1], rtol=0, atol=1e-5)
    assert (a(x)[:, 0] - b(x)[:, 0]).abs().amax() > 1e-4


@torch.no_grad()
def test_kv_cache_prefill_then_single_steps_equals_full_forward(causal_model):
    x = ids(T=20)
    full = causal_model(x)
    cache = KVCache(causal_model.cfg, batch_size=2, max_len=32)
    prefill = 8
    out = [causal_model(x[:, :prefill], kv_cache=cache, cache_pos=0)]
    for p in range(prefill, x.shape[1]):
        out.append(causal_model(x[:, p:p + 1], kv_cache=cache, cache_pos=p))
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-4)


@torch.no_grad()
def test_kv_cache_multi_token_chunks_after_a_prefix(causal_model):
    x = ids(T=20)
    full = causal_model(x)
    cache = KVCache(causal_model.cfg, batch_size=2, max_len=32)
    out, p = [], 0
    for n in (5, 1, 6, 3, 5):  # chunks of several tokens at cache_pos > 0 need the shifted causal mask
        out.append(causal_model(x[:, p:p + n], kv_cache=cache, cache_pos=p))
        p += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-4)


@torch.no_grad()
def test_kv_cache_overflow_is_an_error(causal_model):
    cache = KVCache(causal_model.cfg, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        causal_model(ids(B=1, T=5), kv_cache=cache, cache_pos=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        causal_model(ids(B=1, T=65))


# Counted by hand from the preset shapes (8192-token vocabulary, tied embedding counted once, no biases):
# per block wq d*H*hd + wk, wv d*K*hd + wo H*hd*d + SwiGLU 3*d*ffn + two RMSNorms 2*d; plus embedding 8192*d and the
# final norm d. ffn = 64 * ceil(8/3 * d / 64).
#   tiny  d=96,  hd=24, H=4, K=2, ffn=256:  9216 + 2*4608 + 9216 + 73728 + 192        = 101,568 x 2 + 786,432 + 96
#   small d=256, hd=32, H=8, K=2, ffn=704:  65536 + 2*16384 + 65536 + 540672 + 512    = 705,024 x 6 + 2,097,152 + 256
#   base  d=512, hd=64, H=8, K=2, ffn=1408: 262144 + 2*65536 + 262144 + 2162688 + 1024 = 2,819,072 x 8 + 4,194,304 + 512
PARAMS = {"tiny": (256, 101_568, 989_664), "small": (704, 705_024, 6_327_552), "base": (1408, 2_819_072, 26_747_392)}


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_preset_parameter_counts(preset):
    ffn, per_block, total = PARAMS[preset]
    cfg = ModelConfig.from_preset(preset, vocab_size=8192)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.ffn_hidden == ffn
    assert model.lm_head.weight is model.embed.weight  # tied: counted once
    assert sum(p.numel() for p in model.blocks[0].parameters()) == per_block
    assert model.num_params() == total
    assert sum(p.numel() for p in model.parameters()) == total


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")


@torch.no_grad()
@pytest.mark.parametrize("causal", [True, False])
def test_document_mask_blocks_cross_document_attention(causal):
    model = make(causal=causal)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
    mask = document_attention_mask(doc_ids, causal=False)
    assert mask.shape == (1, 1, 12, 12) and mask.dtype == torch.bool
    x = ids(B=1, T=12)
    y = x.clone()
    y[0, :4] = (y[0, :4] + 1) % V  # change document 0
    z = x.clone()
    z[0, 9:] = (z[0, 9:] + 1) % V  # change document 2
    a, b, c = model(x, attn_mask=mask), model(y, attn_mask=mask), model(z, attn_mask=mask)
    torch.testing.assert_close(a[0, 4:], b[0, 4:], rtol=0, atol=1e-5)  # documents 1 and 2 never saw document 0
    torch.testing.assert_close(a[0, :9], c[0, :9], rtol=0, atol=1e-5)  # documents 0 and 1 never saw document 2
    assert (a[0, :4] - b[0, :4]).abs().amax() > 1e-4
    # Document 1 alone, from position 0: the same logits as inside the packed row (RoPE is relative).
    alone = model(x[:, 4:9])
    torch.testing.assert_close(a[0, 4:9], alone[0], rtol=0, atol=1e-4)
    # Without the mask the documents do see each other (bidirectional: doc 0 sees doc 2; causal: doc 2 sees doc 0).
    nm_x, nm_y = model(x), model(y)
    assert (nm_x[0, 9:] - nm_y[0, 9:]).abs().amax() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("causal", [True, False])
def test_padding_rows_produce_no_nan(causal):
    model = make(causal=causal)
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, -1, -1, -1, -1, -1], [-1] * 8])
    mask = document_attention_mask(doc_ids, causal=causal)
    assert mask.any(-1).all()  # no empty attention row
    x = ids(B=3, T=8)
    out = model(x, attn_mask=mask)
    assert torch.isfinite(out).all()
    # Real tokens never attend to padding: changing padded tokens leaves them unchanged.
    y = x.clone()
    y[1, 3:] = (y[1, 3:] + 1) % V
    torch.testing.assert_close(out[1, :3], model(y, attn_mask=mask)[1, :3], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, :3], model(x[1:2, :3])[0], rtol=0, atol=1e-4)


@torch.no_grad()
def test_document_attention_mask_causal_flag():
    doc_ids = torch.tensor([[0, 0, 1, 1]])
    expected_full = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(document_attention_mask(doc_ids, causal=False)[0, 0], expected_full)
    assert torch.equal(document_attention_mask(doc_ids, causal=True)[0, 0], expected_full.tril())


@torch.no_grad()
def test_load_matching_weights_report():
    src = make(causal=True, seed=1)
    dst = make(causal=False, seed=2)
    state = dict(src.state_dict())
    state["extra.weight"] = torch.zeros(3)
    del state["norm.weight"]
    state["blocks.0.ffn.w_up.weight"] = torch.zeros(5, 5)
    before_norm = dst.norm.weight.clone()
    report = load_matching_weights(dst, state)
    assert set(report) == {"matched", "missing", "unexpected", "shape_mismatch"}
    assert report["unexpected"] == ["extra.weight"]
    assert report["missing"] == ["norm.weight"]
    assert len(report["shape_mismatch"]) == 1 and report["shape_mismatch"][0].startswith("blocks.0.ffn.w_up.weight")
    assert "(5, 5)" in report["shape_mismatch"][0]
    own = dst.state_dict()
    assert set(report["matched"]) == set(own) - {"norm.weight", "blocks.0.ffn.w_up.weight"}
    for name in report["matched"]:
        assert torch.equal(own[name], src.state_dict()[name]), name
    assert torch.equal(dst.norm.weight, before_norm)  # missing: left as initialised
    assert not torch.equal(dst.blocks[0].ffn.w_up.weight, src.blocks[0].ffn.w_up.weight)


@torch.no_grad()
def test_load_matching_weights_vocab_change():
    src = make(seed=1)
    torch.manual_seed(0)
    dst = Transformer(ModelConfig.from_preset("tiny", vocab_size=V + 8, max_seq_len=64))
    report = load_matching_weights(dst, src.state_dict())
    bad = sorted(s.split(":")[0] for s in report["shape_mismatch"])
    assert bad == ["embed.weight", "lm_head.weight"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(dst.blocks[1].attn.wq.weight, src.blocks[1].attn.wq.weight)


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=100, n_heads=8, n_kv_heads=2), "divisible by n_heads"),
    (dict(d_model=96, n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(d_model=96, n_heads=4, n_kv_heads=8), "divisible by n_kv_heads"),
    (dict(d_model=36, n_heads=4, n_kv_heads=2), "head_dim"),  # odd head dim: RoPE needs pairs
    (dict(d_model=96, n_heads=0, n_kv_heads=2), "positive"),
    (dict(d_model=96, n_heads=4, n_kv_heads=0), "positive"),
])
def test_model_config_rejects_bad_head_counts(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=V, n_layers=1, **kw)


def test_model_config_roundtrip():
    cfg = ModelConfig.from_preset("small", vocab_size=123, causal=False)
    assert cfg.head_dim == 32 and cfg.ffn_hidden == 64 * -(-8 * 256 // (3 * 64))
    again = ModelConfig.from_dict({**cfg.to_dict(), "not_a_field": 1})
    assert again == cfg
