"""The shared Transformer backbone for both paradigms (AR and masked diffusion).

A MiniMind/Llama-style pre-norm decoder: RMSNorm, rotary position embeddings (RoPE), grouped-query attention through
``scaled_dot_product_attention``, SwiGLU feed-forward, tied input/output embeddings, no biases, no dropout.
The backbone knows nothing about losses: ``ModelConfig.causal`` decides causal (AR) or bidirectional (diffusion)
attention, an optional boolean ``attn_mask`` covers padding, packed-document boundaries and block masks (the
block-diffusion masks are the two small functions above ``Transformer``), explicit ``positions`` let block diffusion
feed a noisy and a clean copy of one sequence, and a ``KVCache`` serves incremental decoding (AR), prefix caching
(masked diffusion) and the exact cache of finished blocks (block diffusion).

Shapes: B batch, T query length, S key length (cache + new), H heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: dict[str, dict] = {
    # ~1M parameters with an 8k vocabulary: unit tests and CPU smoke runs.
    "tiny": dict(d_model=96, n_layers=2, n_heads=4, n_kv_heads=2),
    # ~6M parameters with an 8k vocabulary: CPU experiments.
    "small": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=2),
    # ~27M parameters with an 8k vocabulary: the flagship, MiniMind2-Small's shape.
    "base": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2),
}


@dataclass
class ModelConfig:
    """Hyper-parameters of the backbone.

    Args:
        vocab_size: Size of the shared vocabulary (the tokenizer's ``vocab_size``).
        d_model: Width of the residual stream.
        n_layers: Number of Transformer blocks.
        n_heads: Number of query heads; ``d_model`` must be divisible by it.
        n_kv_heads: Number of key/value heads (grouped-query attention); must divide ``n_heads``.
        max_seq_len: Longest sequence (prompt + generation) the RoPE table and KV cache cover.
        rope_theta: RoPE base frequency (1e6 as in MiniMind).
        norm_eps: RMSNorm epsilon.
        ffn_hidden: SwiGLU hidden width; ``None`` means ``64 * ceil(8/3 * d_model / 64)``.
        causal: True for autoregressive (causal) attention, False for bidirectional (diffusion).
        init_std: Standard deviation of the normal weight initialisation.
    """

    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    max_seq_len: int = 1024
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    ffn_hidden: int | None = None
    causal: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (d_model / n_heads) must be even for rotary embeddings")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 / 3 * self.d_model / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (T, D/2) using the half-split (Llama/HF) convention."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Pre-allocated keys/values for every layer: (n_layers, B, K, max_len, D).

    Position is explicit: a forward with ``cache_pos=p`` writes its T new keys at [p, p+T) and attends to [0, p+T).
    AR decoding advances p by the tokens it feeds; diffusion prefix caching writes a prefix once and then refines a
    block at a fixed p, overwriting the same slots each step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None, cache_pos: int):
        """x (B, T, d) -> (B, T, d). attn_mask: bool (B or 1, 1, T, S), True = may attend; None = no mask."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, cache_pos, k, v)
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        if rep > 1:  # expand kv heads; works with every SDPA backend and torch version
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # is_causal aligns the mask top-left, correct only when queries and keys start at the same position.
        is_causal = self.cfg.causal and attn_mask is None and k.shape[2] == T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask, kv_cache, cache_pos):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache, cache_pos)
        return x + self.ffn(self.ffn_norm(x))


def document_attention_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean mask (B, 1, T, T): a token attends only to tokens of its own document (and, if causal, not ahead).

    Padding gets its own document id (e.g. -1), so real tokens never attend to padding and padding rows are never
    empty (an all-False row would make SDPA return NaN).
    """
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        T = doc_ids.shape[1]
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return mask[:, None]


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(T, T) bool: position i may attend to j iff block(j) <= block(i), blocks of ``block_size`` from position 0
    (bidirectional inside a block, causal across blocks). Block-diffusion decoding runs the model with this mask."""
    blk = torch.arange(length, device=device) // block_size
    return blk[None, :] <= blk[:, None]


def block_diffusion_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Training attention of block diffusion (BD3-LM / LLaDA 2.0 eq. 3) on the input ``x_t ⊕ x_0`` of length 2L.

    doc_ids (B, L) long: the document of each position (padding its own id, e.g. -1) -> bool (B, 1, 2L, 2L),
    True = may attend. Index i < L is the noisy copy x_t of position i, index L + i the clean copy x_0; with
    b(i) = (i mod L) // block_size:

    - M_BD  (block diagonal): b(q) == b(k), both in the same half -- a noisy block sees itself, a clean block itself;
    - M_OBC (offset block causal): b(q) > b(k), q in x_t, k in x_0 -- a noisy block sees the earlier clean blocks;
    - M_BC  (block causal): b(q) >= b(k), both in x_0 -- the clean half is block-causal;

    intersected with "same document" (packed rows; padding only sees padding). x_0 never attends to x_t. With
    block_size = L it is plain bidirectional attention over x_t (masked diffusion); with 1, x_t position i sees
    itself and x_0[< i] (next-token prediction from a mask). L must be a multiple of block_size.
    """
    B, L = doc_ids.shape
    if L % block_size:
        raise ValueError(f"sequence length {L} is not a multiple of block_size {block_size}")
    idx = torch.arange(2 * L, device=doc_ids.device)
    clean = idx >= L
    blk = (idx % L) // block_size
    same_half = clean[:, None] == clean[None, :]
    m_bd = (blk[:, None] == blk[None, :]) & same_half
    m_obc = (blk[:, None] > blk[None, :]) & ~clean[:, None] & clean[None, :]
    m_bc = (blk[:, None] >= blk[None, :]) & clean[:, None] & clean[None, :]
    docs = doc_ids.repeat(1, 2)  # (B, 2L)
    same_doc = docs[:, :, None] == docs[:, None, :]
    return ((m_bd | m_obc | m_bc)[None] & same_doc)[:, None]


class Transformer(nn.Module):
    """Token ids (B, T) -> logits (B, T, V). The same module serves AR (causal) and diffusion (bidirectional)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied embeddings
        cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12 * layers * d * seq_len for attention scores."""
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def forward(
        self,
        idx: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_pos: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T) or pre-computed inputs_embeds (B, T, d).

        attn_mask: optional bool (B or 1, 1, T, S), True = may attend, S = cache_pos + T. When the model is causal the
        causal constraint is added to it here, so callers pass only padding/document/block structure.
        kv_cache/cache_pos: write this call's keys/values at [cache_pos, cache_pos + T) and attend to [0, cache_pos + T).
        positions: optional (T,) long RoPE positions of the T inputs (default cache_pos .. cache_pos + T - 1); block
        diffusion feeds ``x_t ⊕ x_0`` with positions 0..L-1 twice.
        """
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        S = cache_pos + T
        if S > self.cfg.max_seq_len and positions is None:
            raise ValueError(f"sequence of {S} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[cache_pos:S], self.rope_sin[cache_pos:S]
        else:  # the caller keeps positions < max_seq_len (checked by shape there: no host sync here)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if self.cfg.causal and (attn_mask is not None or (cache_pos > 0 and T > 1)):
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=cache_pos)
            attn_mask = causal[None, None] if attn_mask is None else attn_mask & causal
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask, kv_cache, cache_pos)
        return self.lm_head(self.norm(x)).float()


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor whose name and shape match (weight-matching load); report the rest.

    Returns {"matched": [...], "missing": [...] (in model, not loaded), "unexpected": [...] (in file, unused),
    "shape_mismatch": [...]} so callers can log exactly what happened.
    """
    own = model.state_dict()
    report: dict[str, list[str]] = {"matched": [], "missing": [], "unexpected": [], "shape_mismatch": []}
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name not in own:
                report["unexpected"].append(name)
            elif own[name].shape != tensor.shape:
                report["shape_mismatch"].append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
            else:
                own[name].copy_(tensor)
                report["matched"].append(name)
    report["missing"] = [n for n in own if n not in state_dict]
    return report
