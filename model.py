"""
model.py -- a self-contained LLaMA (Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2) for nanoMASA.

Reads a Hugging Face `config.json` and safetensors weights directly (no `transformers`), with module
names equal to the checkpoint's keys (`model.layers.N.self_attn.q_proj`), so loading is a strict key
match and adapters target projections by name. The tokenizer is in tokenizer.py (re-exported here).
References: Touvron et al. 2023 (Llama 2), Meta's Llama 3 reference `model.py` / `tokenizer.py`,
Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA), Holtzman et al. 2020 (top-p sampling),
the Qwen2 and Mistral model cards.

Run:  python model.py --model DIR --prompt "Once upon a time" [--max_new_tokens 64 --temperature 0.7]
"""
import argparse
import errno
import hashlib
import json
import math
import mmap
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# the tokenizer lives in tokenizer.py; LoadError and read_json are shared with it, and re-exported here
from tokenizer import LoadError, Tokenizer, read_json  # noqa: F401

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors names


def resolve_dtype(dtype):
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; anything else -> LoadError."""
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise LoadError(f"unsupported dtype {str(dtype)!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def error_line(e):
    """The one line `error: ...` that every command prints for bad input or a fault (docs/bad-input.md): the
    exception's own message for ours (problem and fix already in it); for an OSError from the system (a full
    disk, a folder that is a file, no permission), its file, the system's reason and what to do."""
    if isinstance(e, OSError) and e.strerror:
        fix = {errno.ENOSPC: "free disk space and run again", errno.EDQUOT: "free disk space and run again",
               errno.EACCES: "check its permissions or choose another path", errno.EROFS: "choose a writable path",
               errno.EPERM: "check its permissions or choose another path",
               errno.ENOTDIR: "a part of the path is a file: choose another path",
               errno.EISDIR: "it is a folder: name a file"}.get(e.errno, "check the path and run again")
        return f"error: {e.filename or ''}: {e.strerror.lower()}: {fix}".replace("error: : ", "error: ")
    if isinstance(e, KeyError):  # a bare KeyError's text is only the key
        return f"error: missing field {e.args[0]!r}: check the file it was read from"
    return "error: " + " ".join(str(e).split())  # one line, whatever the message held


@contextmanager
def one_line_errors(quiet=False, interrupt=True):
    """Run a command's body; bad input (ValueError: LoadError, TrainError, ...) and system faults (OSError) end
    in error_line(e) on stderr and exit status 1, without a traceback. quiet: print nothing (DDP ranks > 0).
    interrupt: Ctrl-C ends the same way (train.py says more: which checkpoint is kept, how to resume)."""
    try:
        yield
    except (ValueError, OSError, KeyError) as e:
        if not quiet:
            print(error_line(e), file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if not interrupt:
            raise
        if not quiet:  # every file is written to a temporary name and renamed: none is left half-written
            print("error: interrupted (Ctrl-C): files are written whole or not at all; run the command again",
                  file=sys.stderr, flush=True)
        sys.exit(1)


def write_atomic(path, write):
    """write(tmp_path) beside `path`, then rename into place: a reader never sees half a file, and a failed
    write leaves the old file (adapters, checkpoints and exports all go through here)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

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
    rms_norm_eps: float = 1e-5              # epsilon inside RMSNorm's sqrt
    rope_theta: float = 10000.0             # RoPE base
    rope_scaling: Optional[dict] = None     # {"rope_type": "llama3"|"linear", ...} or None
    max_position_embeddings: int = 4096     # context length the checkpoint was trained for (informational)
    tie_word_embeddings: bool = False       # lm_head shares embed_tokens' weight
    attention_bias: bool = False            # q/k/v biases (Qwen2: True)
    sliding_window: Optional[int] = None    # Mistral: attend to at most this many past tokens
    bos_token_id: Optional[int] = None      # from config.json; the tokenizer's bos_id is what encode() uses
    eos_token_id: list = field(default_factory=list)  # stop tokens for generate()
    dtype: str = "float32"                  # the checkpoint's stored dtype

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, path):
        """Read a Hugging Face config.json; `path` is the checkpoint folder or the file itself."""
        path = Path(path)
        if not path.exists():
            raise LoadError(f"{path} does not exist: pass a Hugging Face checkpoint folder (config.json + *.safetensors)")
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise LoadError(f"{file} not found: the checkpoint folder needs the config.json it was saved with")
        return cls.from_hf_dict(read_json(file), where=str(file))

    @classmethod
    def from_hf_dict(cls, d, where="config.json"):
        """Both flavours of config.json: the Hub's (rope_theta, rope_scaling, torch_dtype) and the one
        transformers 5 writes (rope_parameters = {rope_type, rope_theta, ...}, dtype)."""
        arch = (d.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise LoadError(f"{where}: unsupported architecture {arch!r}; nanoMASA supports {', '.join(ARCHITECTURES)}")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind not in ROPE_TYPES:
            raise LoadError(f"{where}: unsupported rope type {kind!r}; nanoMASA supports {', '.join(ROPE_TYPES)}")
        if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias"):
            raise LoadError(f"{where}: only the SwiGLU MLP (hidden_act silu, no mlp_bias) is supported")
        if arch == "LlamaForCausalLM" and d.get("attention_bias"):
            raise LoadError(f"{where}: attention_bias=true (biased o_proj) is not supported for LlamaForCausalLM")
        if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
            raise LoadError(f"{where}: Qwen2's per-layer sliding window (use_sliding_window=true) is not supported")
        eos = d.get("eos_token_id")
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        resolve_dtype(dtype)
        try:
            n_heads = d["num_attention_heads"]
            n_kv_heads = d.get("num_key_value_heads") or n_heads
            cfg = cls(
                architecture=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], n_layers=d["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=arch == "Qwen2ForCausalLM",  # Qwen2 always has q/k/v biases
                sliding_window=d.get("sliding_window") if arch == "MistralForCausalLM" else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                dtype=DTYPE_ALIASES.get(dtype, dtype))
            rope_inv_freq(cfg)  # validates the scaling fields now rather than at construction
        except KeyError as e:
            raise LoadError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, AttributeError) as e:  # e.g. "hidden_size": "64", or rope_scaling a list
            raise LoadError(f"{where}: a field has the wrong type ({e}): fix config.json or re-download it") from None
        # Values a model cannot run with are refused here, not found later as NaN logits (a negative rope_theta
        # or rms_norm_eps makes every logit NaN, and train.py would then blame the learning rate).
        hf = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
              "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings"}
        for k, name in hf.items():
            v = getattr(cfg, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LoadError(f"{where}: {name} is {v!r}, not a positive integer: fix config.json or re-download it")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(cfg, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise LoadError(f"{where}: {k} is {v!r}, not a finite number > 0: fix config.json or re-download it")
        if n_heads % n_kv_heads:
            raise LoadError(f"{where}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
        return cfg

    def to_hf_dict(self):
        """config.json in the Hub flavour (read by transformers 4 and 5 and by from_hf_dict)."""
        d = dict(architectures=[self.architecture], model_type=ARCHITECTURES[self.architecture],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.n_layers,
                 num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                 hidden_act="silu", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                 rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                 eos_token_id=self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None),
                 torch_dtype=self.dtype)
        if self.architecture == "LlamaForCausalLM":
            d.update(attention_bias=False, mlp_bias=False)
        if self.architecture == "MistralForCausalLM":
            d.update(sliding_window=self.sliding_window)
        if self.architecture == "Qwen2ForCausalLM":
            d.update(use_sliding_window=False, sliding_window=None)
        return d

    def fingerprint(self):
        """Short hash of the fields that fix parameter names and shapes (adapters record it)."""
        keys = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                "n_kv_heads", "head_dim", "attention_bias", "tie_word_embeddings")
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:12]

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
    d = cfg.head_dim  # always on the CPU: a few numbers, and meta-device math would import torch._dynamo
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
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
    raise LoadError(f"unsupported rope type {kind!r}; nanoMASA supports {', '.join(ROPE_TYPES)}")


def apply_rope(x, cos, sin):
    # HF checkpoints permute q/k rows so that the pair (i, i + d/2) is rotated together; rotating
    # halves here is therefore the paper's pairwise rotation of (2i, 2i+1) in the original basis.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0, prefix=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if prefix is not None:  # P-tuning v2 without a cache: this layer's P trained keys/values (unrotated) first
            k = torch.cat((prefix[0].expand(B, -1, -1, -1), k), dim=2)                 # (B, Hkv, P + T, D)
            v = torch.cat((prefix[1].expand(B, -1, -1, -1), v), dim=2)
        if cache is not None:  # write this step's keys/values, attend over everything so far
            ck, cv = cache
            ck[:B, :, start_pos:start_pos + T] = k
            cv[:B, :, start_pos:start_pos + T] = v
            k, v = ck[:B, :, :start_pos + T], cv[:B, :, :start_pos + T]
        # GQA: SDPA lets each kv head serve n_heads / n_kv_heads queries without materialising copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                         # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, start_pos=0, prefix=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


def sample_next(logits, temperature=0.0, top_p=1.0):
    """logits (B, V) -> next ids (B,). Greedy at temperature 0; otherwise sample softmax(logits / T)
    restricted to the nucleus: the most probable tokens whose mass first reaches top_p (Holtzman et al.
    2020), renormalised. The top token is always kept."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, i = probs.sort(-1, descending=True)
        p = p * (p.cumsum(-1) - p < top_p)  # keep a token if the mass before it is still short of top_p
        probs = torch.zeros_like(probs).scatter_(-1, i, p)
    return torch.multinomial(probs, 1)[:, 0]


class Transformer(nn.Module):
    gradient_checkpointing = False  # when True and training: recompute each block in backward (less memory)
    loss_chunk = 2**28              # response_loss: fp32 logits computed at a time (elements; 2**28 = 1 GiB)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # the HF `model.` prefix, so state-dict keys match checkpoints
        # On the meta device (from_pretrained) hand nn.Embedding a weight: its normal_ init there imports
        # torch._dynamo, ~1.5 s of a load that otherwise takes well under a second.
        w = torch.empty(cfg.vocab_size, cfg.hidden_size) if torch.empty(0).is_meta else None
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=w)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.soft_prompt = None  # set by adapters.inject for prompt tuning / P-tuning v2; see add_soft_prompt

    def rope(self, pos, dtype):
        """cos/sin for integer positions pos (B, T) -> (B, 1, T, head_dim), computed in fp32 as HF does."""
        inv_freq = self.inv_freq  # model.to(bf16) also casts this buffer; bf16 angles drift at long positions
        if inv_freq.dtype != torch.float32:
            inv_freq = rope_inv_freq(self.config)
        freqs = pos[..., None].float() * inv_freq.to(pos.device)               # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(self, idx, targets=None, attention_mask=None, cache=None, start_pos=0, logits_to_keep=0,
                return_logits=True, reduction="mean"):
        """idx (B, T) token ids. targets (B, T), already shifted (targets[t] is the token after idx[t]),
        -100 = ignored. attention_mask (B, start_pos + T): 1 for real tokens, 0 for padding.
        cache: make_cache()'s per-layer buffers, filled from start_pos on.
        logits_to_keep n > 0: lm_head only for the last n positions (targets are cut alike); 0 = all.
        return_logits=False: lm_head only on rows whose target is not -100 (response_loss), returns (None, loss).
        reduction: "mean" over the non-ignored targets, or "sum" (0 when every target is ignored).
        With a soft prompt attached, start_pos and attention_mask still count real tokens only (add_soft_prompt).
        Returns logits (B, T, V), or (logits, loss) when targets are given."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        x, prefix = self.model.embed_tokens(idx), None
        if self.soft_prompt is not None:  # P virtual positions before the real tokens
            x, prefix, start_pos, attention_mask = self.add_soft_prompt(x, start_pos, attention_mask, cache)
        B, T = x.shape[:2]
        pos = torch.arange(start_pos, start_pos + T, device=idx.device).expand(B, T)
        if attention_mask is not None:  # left padding: real tokens count positions from 0
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:start_pos + T]
        cos, sin = self.rope(pos, x.dtype)
        mask = self.attn_mask(B, T, start_pos, attention_mask, idx.device)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            pre = None if prefix is None else prefix[i]
            if recompute:  # keep only each block's input; rerun the block in backward (Chen et al. 2016)
                x = checkpoint(layer, x, cos, sin, mask, None, 0, pre, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache[i], start_pos, pre)
        if x.size(1) > idx.size(1):  # prompt tuning: the virtual positions get no logits and no loss
            x = x[:, -idx.size(1):]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]                                                # (B, n, C)
            targets = None if targets is None else targets[:, -logits_to_keep:]
        if targets is not None and not return_logits:
            return None, self.response_loss(x, targets, reduction)
        logits = self.lm_head(self.model.norm(x))                                     # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        return logits, loss

    def add_soft_prompt(self, x, start_pos, attention_mask, cache):
        """The model's sequence becomes [P virtual positions; the real tokens] (as in peft): real token t sits at
        position P + t, in the cache too, and the mask marks the virtual positions real. Prompt tuning (`deep`
        False) prepends P trained input embeddings on the first call (start_pos 0), which later calls find in the
        cache. P-tuning v2 (`deep`) has no inputs, only trained keys/values (L, 2, Hkv, P, D) that every layer
        attends to: written into the cache's first P slots on the first call, or passed to the layers when there
        is no cache. Returns x, the per-layer prefix or None, and start_pos, attention_mask shifted by P."""
        sp, first = self.soft_prompt, start_pos == 0
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask.new_ones(x.size(0), sp.P), attention_mask), dim=1)
        if not sp.deep:
            if first:
                x = torch.cat((sp.embeds(x.dtype).expand(x.size(0), -1, -1), x), dim=1)  # (B, P + T, C)
            return x, None, start_pos + (0 if first else sp.P), attention_mask
        prefix = sp.kv(x.dtype) if cache is None else None                         # (L, 2, Hkv, P, D)
        if cache is not None and first:
            for (ck, cv), (pk, pv) in zip(cache, sp.kv(x.dtype)):
                ck[:x.size(0), :, :sp.P], cv[:x.size(0), :, :sp.P] = pk, pv
        return x, prefix, start_pos + sp.P, attention_mask

    def response_loss(self, x, targets, reduction="mean"):
        """Cross-entropy of the last hidden states x (B, T, C) against targets (B, T): norm, lm_head and fp32
        log-softmax only on rows whose target is not -100, loss_chunk logits at a time. With autograd and several
        chunks each is recomputed in backward, so one chunk of logits is alive (not B*T*V: 4.2 GB for 8 x 1024
        Llama 3 tokens)."""
        keep = (targets.flatten() != -100).nonzero()[:, 0]                             # (N,) a host sync on GPUs
        h, tgt = x.flatten(0, 1)[keep], targets.flatten()[keep]                        # (N, C), (N,)
        rows = max(1, self.loss_chunk // self.config.vocab_size)
        chunks = list(zip(h.split(rows), tgt.split(rows)))
        ce_sum = lambda h, t: F.cross_entropy(self.lm_head(self.model.norm(h)).float(), t, reduction="sum")
        if len(chunks) > 1 and torch.is_grad_enabled():
            ce_sum = partial(checkpoint, ce_sum, use_reentrant=False)
        loss = sum(ce_sum(hc, tc) for hc, tc in chunks)
        return loss / len(tgt) if reduction == "mean" else loss

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

    def make_cache(self, B, max_len):
        """Per-layer (k, v) buffers (B, n_kv_heads, P + max_len, head_dim) for incremental decoding of max_len
        tokens (P: a soft prompt's virtual positions, else 0)."""
        w = self.model.embed_tokens.weight
        P = 0 if self.soft_prompt is None else self.soft_prompt.P
        shape = (B, self.config.n_kv_heads, P + max_len, self.config.head_dim)
        return [(w.new_empty(shape), w.new_empty(shape)) for _ in self.model.layers]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, attention_mask=None,
                 use_cache=True):
        """Append up to max_new_tokens to idx (B, T) -> (B, T + n), n <= max_new_tokens. Greedy at
        temperature 0, else temperature + top-p sampling (sample_next). A row that emits a token in
        stop_ids is finished and repeats that token until every row is finished (then we stop).
        attention_mask (B, T) marks left padding. use_cache=False recomputes the whole prefix each step."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1 "
                             f"(got {max_new_tokens}, {temperature}, {top_p})")
        B, T = idx.shape
        stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = self.make_cache(B, T + max_new_tokens) if use_cache else None
        out, am, pos = idx, attention_mask, 0
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(out, attention_mask=am, logits_to_keep=1)
            else:  # prefill the prompt once, then feed one new token per step
                logits = self(out[:, pos:], attention_mask=am, cache=cache, start_pos=pos, logits_to_keep=1)
                pos = out.size(1)
            nxt = sample_next(logits[:, -1], temperature, top_p)                   # (B,)
            nxt = torch.where(done, out[:, -1], nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if am is not None:
                am = torch.cat([am, am.new_ones(B, 1)], dim=1)
            done |= torch.isin(nxt, stop)
            if done.all():
                break
        return out

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Strict load of a HF checkpoint folder: config.json + model.safetensors (or a sharded
        model.safetensors.index.json), read with safetensors. dtype None keeps config.json's dtype.
        The module is built on the meta device (no random init), every key and shape is checked before
        any weight is read, then each file is memory-mapped (privately: writes never reach it) and the
        parameters are swapped in one tensor at a time, so there is never a second copy. On the CPU without
        a cast a parameter is the map itself (zero-copy, paged in on first use, as transformers does);
        otherwise copy_from_map converts it chunk by chunk, so the peak is the weights plus one chunk."""
        path = Path(path)
        cfg = ModelConfig.from_hf(path)
        dtype = resolve_dtype(cfg.dtype if dtype is None else dtype)
        cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
        headers = {f: safetensors_header(path / f) for f in weight_files(path)}  # {file: {key: (dtype, shape, offset)}}
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(p.shape) for k, p in model.named_parameters()}  # tied lm_head appears once
        found = {k: (f, *e) for f, h in headers.items() for k, e in h.items()
                 if not k.endswith("rotary_emb.inv_freq")}  # old conversions stored this buffer
        if cfg.tie_word_embeddings:
            found.pop("lm_head.weight", None)  # some tied checkpoints store the copy; embed_tokens wins
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        if missing or unexpected:
            few = lambda ks: ", ".join(ks[:3]) + (f" (+{len(ks) - 3} more)" if len(ks) > 3 else "")
            raise LoadError(f"{path}: weights do not match config.json: missing keys [{few(missing)}], unexpected "
                            f"keys [{few(unexpected)}]; check that config.json belongs to these weights")
        for k, shape in expected.items():
            f, st, actual, _ = found[k]
            if actual != shape:
                raise LoadError(f"{path / f}: {k} has shape {list(actual)} but config.json implies {list(shape)}; "
                                f"check that config.json belongs to these weights")
            if st not in ST_DTYPES:
                raise LoadError(f"{path / f}: {k} is stored as {st}; only F32/BF16/F16 weights are supported "
                                f"(dequantise the checkpoint first)")
        for f, header in headers.items():
            with open(path / f, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # stays mapped while a tensor uses it
            for k, (st, shape, start) in header.items():
                if k in expected:
                    src = torch.frombuffer(mm, dtype=ST_DTYPES[st], count=math.prod(shape), offset=start)
                    zero_copy = src.dtype == dtype and torch.device(device).type == "cpu"  # the map itself
                    t = src if zero_copy else copy_from_map(src, mm, start, dtype, device)
                    owner, _, name = k.rpartition(".")
                    setattr(model.get_submodule(owner), name, nn.Parameter(t.view(shape)))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in checkpoints: recompute off meta
        model.base_weights = weights_fingerprint(path)  # save_adapter records it; load_adapter compares it
        return model.eval()

    def save_pretrained(self, out_dir, state_dict=None):
        """The inverse of from_pretrained: config.json + model.safetensors in out_dir, each written atomically,
        loadable here and by transformers. state_dict (default: the model's own) lets a caller substitute
        weights, e.g. merged adapters; a tied lm_head is stored once, as embed_tokens, as HF does."""
        sd = self.state_dict() if state_dict is None else state_dict
        if self.config.tie_word_embeddings:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
        hf = {**self.config.to_hf_dict(), "torch_dtype": str(next(iter(sd.values())).dtype).removeprefix("torch.")}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
        write_atomic(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2)))

# -----------------------------------------------------------------------------
# checkpoint files


def weight_files(path):
    """The safetensors files of a checkpoint folder, from the shard index when there is one."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise LoadError(f"{index} is corrupt (no weight_map): re-download it") from None
    elif single.is_file():
        files = [single.name]
    else:
        raise LoadError(f"no model.safetensors or model.safetensors.index.json in {path}: "
                        f"nanoMASA reads safetensors weights only (re-save with safe_serialization=True)")
    for f in files:
        if not (path / f).is_file():
            raise LoadError(f"{path / f} (listed in {index.name}) is missing: download every shard")
    return files


def safetensors_header(file):
    """{key: (safetensors dtype, shape, byte offset of its data)} without reading tensor data; safetensors
    itself first checks that the header is well formed and that the file holds every byte it promises."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except SafetensorError as e:
        raise LoadError(f"{file} is truncated or corrupt (safetensors: {e}): re-download or re-save it") from None
    with open(file, "rb") as f:  # layout: u64 little-endian n, n bytes of JSON header, then the data
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0]) for k, v in header.items()}


def weights_fingerprint(path, windows=8, width=512):
    """Content fingerprint of a checkpoint's weights, cheap at any size (an adapter and a --resume record it, so
    that they refuse another base of the same shape, e.g. a base and its instruct variant). sha256 over every
    tensor's name, dtype and shape and `windows` evenly spaced `width`-byte slices of its data (all of it when
    smaller), in name order: 4 KiB per tensor, independent of the sharding and the file's metadata. A
    fine-tune changes (nearly) every weight, so it changes the sampled bytes; an edit confined to a few
    bytes outside the slices is not seen (this is a fingerprint, not a checksum). Measured in bench/BENCHMARKS.md."""
    path = Path(path)
    entries = []
    for f in weight_files(path):
        safetensors_header(path / f)  # a truncated or corrupt file is refused in one line first
        with open(path / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for k, v in header.items():
                lo, hi = v["data_offsets"]
                size = hi - lo
                starts = [0] if size <= windows * width else [i * (size - width) // (windows - 1) for i in range(windows)]
                chunks = []
                for a in starts:
                    fh.seek(8 + n + lo + a)
                    chunks.append(fh.read(min(width, size) if size > windows * width else size))
                entries.append((k, v["dtype"], v["shape"], b"".join(chunks)))
    h = hashlib.sha256()
    for k, st, shape, data in sorted(entries):
        h.update(json.dumps([k, st, shape]).encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def copy_from_map(src, mm, start, dtype, device, chunk=2**24):
    """src (1-D view of memory map mm at byte `start`) -> dtype on device, `chunk` elements at a time; after
    each chunk the file pages read so far leave this process (they stay in the page cache), so the peak is
    the converted weights plus one chunk. One thread: page faults dominate, and threads faulting together
    contend (2-4x slower with 2 threads on a busy 2-core machine; the arithmetic is ~1/4 of the time)."""
    out = torch.empty(src.numel(), dtype=dtype, device=device)
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants page alignment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, src.numel(), chunk):
            out[i:i + chunk].copy_(src[i:i + chunk])
            if hasattr(mm, "madvise"):  # from the tensor's start: also the pages faulted back around chunk edges
                mm.madvise(mmap.MADV_DONTNEED, lo, start + min(i + chunk, src.numel()) * src.element_size() - lo)
    finally:
        torch.set_num_threads(threads)
    return out

# -----------------------------------------------------------------------------
# command line


class ArgParser(argparse.ArgumentParser):
    """argparse with nanoMASA's bad-input rule: one `error: ...` line on stderr and exit 1 (every script uses it);
    under torchrun the first process prints it, as one_line_errors does (every process gets the same argv)."""
    def error(self, message):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def check_device(device):
    """Refuse a device this torch build cannot use, in one line (instead of an assertion deep inside torch)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no usable CUDA: pass --device cpu, "
                         f"or install a CUDA build of torch (see README, Installing on a GPU)")
    return dev


def main(argv=None):
    p = ArgParser(description="Print a completion of --prompt from a Hugging Face Llama / Mistral / Qwen2 checkpoint.")
    p.add_argument("--model", required=True, help="checkpoint folder: config.json, *.safetensors, tokenizer")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass kept when sampling")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                 "config.json's dtype on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with one_line_errors():
        check_device(a.device)
        tok = Tokenizer.from_pretrained(a.model)
        dtype = a.dtype or ("float32" if a.device == "cpu" else None)
        model = Transformer.from_pretrained(a.model, dtype=dtype, device=a.device)
        if tok.n_vocab > model.config.vocab_size:
            raise LoadError(f"tokenizer has {tok.n_vocab} ids but the model only {model.config.vocab_size}: "
                            f"tokenizer and weights come from different checkpoints")
        torch.manual_seed(a.seed)
        idx = torch.tensor([tok.encode(a.prompt, bos=True)], device=a.device)  # framed as the checkpoint's tokenizer does
        out = model.generate(idx, a.max_new_tokens, a.temperature, a.top_p, stop_ids=tok.stop_ids)
    new = out[0, idx.size(1):].tolist()
    cut = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    print(tok.decode(new[:cut]))


if __name__ == "__main__":
    main()
