"""
model.py -- a self-contained LLaMA (Llama 2/3/3.1/3.2, Mistral, Qwen2) for nanoMASA.

Reads a Hugging Face `config.json` and safetensors weights directly (no `transformers`), with module
names equal to the checkpoint's keys (`model.layers.N.self_attn.q_proj`), so loading is a strict key
match and adapters target projections by name. References: Touvron et al. 2023 (Llama 2), the Llama 3
reference `model.py`, Qwen2 and Mistral model cards.

Run:  python model.py --model DIR --prompt "Once upon a time"
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"  # HF `architectures[0]`
    vocab_size: int = 32000                 # V, rows of embed_tokens / lm_head
    hidden_size: int = 4096                 # d_model
    intermediate_size: int = 11008          # d_ff of the SwiGLU MLP
    n_layers: int = 32                      # L, HF num_hidden_layers
    n_heads: int = 32                       # query heads, HF num_attention_heads
    n_kv_heads: int = 32                    # key/value heads (GQA when < n_heads)
    head_dim: int = 128                     # per-head width (hidden_size // n_heads unless given)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0             # RoPE base
    rope_scaling: Optional[dict] = None     # {"rope_type": "llama3"|"linear", ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False       # lm_head shares embed_tokens' weight
    attention_bias: bool = False            # q/k/v biases (Qwen2: True)
    sliding_window: Optional[int] = None    # Mistral: attend to at most this many past tokens
    bos_token_id: Optional[int] = None
    eos_token_id: list = field(default_factory=list)  # stop tokens for generate()
    dtype: str = "float32"                  # the checkpoint's stored dtype

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


# -----------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, then scale: the order HF Llama/Qwen2/Mistral use
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies theta^(-2i/d), rescaled per cfg.rope_scaling (linear or llama3)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv_freq / sc["factor"]
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, interpolate between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}: nanoMASA supports 'linear' and 'llama3'")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # HF checkpoints permute q/k rows so that the pair (i, i + d/2) is rotated together; rotating
    # halves here is therefore the paper's pairwise rotation of (2i, 2i+1) in the original basis.
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values, attend over everything so far
            ck, cv = cache
            ck[:B, :, start_pos:start_pos + T] = k
            cv[:B, :, start_pos:start_pos + T] = v
            k, v = ck[:B, :, :start_pos + T], cv[:B, :, :start_pos + T]
        if self.n_kv_heads != self.n_heads:  # GQA: each kv head serves n_heads / n_kv_heads queries
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # the HF `model.` prefix, so state-dict keys match checkpoints
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, pos, dtype):
        """cos/sin for integer positions pos (B, T) -> (B, 1, T, head_dim), computed in fp32 as HF does."""
        freqs = pos[..., None].float() * self.inv_freq.float().to(pos.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, idx, targets=None, attention_mask=None, cache=None, start_pos=0):
        """idx (B, T) token ids. targets (B, T), already shifted (targets[t] is the token after idx[t]),
        -100 = ignored. attention_mask (B, start_pos + T): 1 for real tokens, 0 for padding.
        Returns logits (B, T, V), or (logits, loss) when targets are given."""
        B, T = idx.shape
        x = self.model.embed_tokens(idx)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device).expand(B, T)
        if attention_mask is not None:  # left padding: real tokens count positions from 0
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:start_pos + T]
        cos, sin = self.rope(pos, x.dtype)
        mask = self.attn_mask(B, T, start_pos, attention_mask, idx.device)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], start_pos)
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def attn_mask(self, B, T, start_pos, attention_mask, device):
        """Boolean (B, 1, T, S) mask (True = attend) or None when plain causal attention suffices."""
        S = start_pos + T
        window = self.config.sliding_window
        if attention_mask is None and (T == 1 or start_pos == 0) and not (window and S > window):
            return None  # is_causal (T > 1) or a single query that sees everything (T == 1)
        i = torch.arange(start_pos, S, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        m = j <= i
        if window:
            m = m & (i - j < window)
        m = m[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            m = m & attention_mask[:, None, None, :S].bool()
            m = m | (i == j)  # a padding query still sees itself, so no row is empty (no NaN)
        return m
