"""
adapters.py -- parameter-efficient adapters for nanoMASA's Transformer, as plain nn.Modules.

Implements (formulas in ../shared/SPEC.md; each forward below cites its paper and equation):
  LoRA      Hu et al., 2022            y = W0 x + s B A x̃                 (rsLoRA: Kalajdzievski, 2023)
  DoRA      Liu et al., 2024           y = m ⊙ (W0 + s B A) x̃ / ||W0 + s B A||_row
  HydraLoRA Tian et al., 2024          y = W0 x + s Σ_j g_j(x) B_j A x̃
  MASA      Dong et al., 2025          y = W0 x + s B^(l) (Σ_i A_i^(k)) x̃, a bank of N experts A_i shared
                                       by S adjacent layers; ablations: router, B/AB/no sharing, several B
  RaSA      He et al., 2025            y = W0 x + B_l (D_l^priv ⊙ A_l x̃) + B_S (D_l^shared ⊙ A_S x̃), a pool
                                       A_S (kL, d_in), B_S (d_out, kL) per module type used by every layer
  MoSA      Wang et al., 2026          y = (W0 + ΔW) x, ΔW[i, j] = λ[g(i, j)]: one scalar per random group of
                                       weight entries (partition, reductions and the linear: kernels.py)
  VeRA      Kopiczko et al., 2024      y = W0 x + Λ_b B Λ_d A x̃, A and B frozen random (one pair, rebuilt from the
                                       seed), trained: the vectors d (r,) and b (d_out,) of each module
  VB-LoRA   Li et al., 2024            y = W0 x + B A x̃, every length-b piece of A and B a top-k softmax mixture of
                                       the vectors of ONE bank (h, b) shared by all modules and layers
Each adapter wraps a frozen nn.Linear in place and takes over its `weight`/`bias` Parameters, so the base
state-dict keys (`model.layers.0.self_attn.q_proj.weight`) do not change. A tensor shared by several
layers (MASA's bank, RaSA's pool) lives once in `model.adapter_banks` (`adapter_banks.q_proj.A.0`) and
layers reach it through a `Shared` handle, so it is counted, saved, optimised and all-reduced once and
its gradient is the sum over the layers that use it.

    params = inject(model, AdapterConfig(adapter="masa"))   # freezes the base, returns the trainables
    save_adapter(model, "out"); acfg = load_adapter(fresh_model, "out")
    merge(model); unmerge(model); export_peft(model, "peft_dir"); export_merged(model, "hf_dir")

Parameter report on the meta device (no weights needed):
    python adapters.py --model llama3-8b --adapter masa --r 8 --num_a 5 --share_group 2 --agg router [--json]
    python adapters.py --model llama3-8b --adapter rasa --r 8 --rasa_k 1
    python adapters.py --model llama3-8b --adapter mosa          # r = 32 budget, q,k,v,up,down (SPEC defaults)
    python adapters.py --model llama3-8b --adapter vera          # r = 1024, d_init = 0.1
    python adapters.py --model llama3-8b --adapter vblora        # r = 4, h = 2048 vectors of b = 256, top-k = 2
"""
import argparse
import hashlib
import inspect
import json
import math
import re
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels
from model import ArgParser, ModelConfig, Transformer, write_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOSA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # SPEC.md: MoSA's default targets

# -----------------------------------------------------------------------------
# config


@dataclass
class AdapterConfig:
    adapter: str = "lora"              # lora | dora | hydralora | masa | rasa | mosa | vera | vblora
    r: Optional[int] = None            # rank r: A (r, d_in), B (d_out, r); unset: 8, for mosa 32 (SPEC: LoRA r=32's budget), vera 1024, vblora 4
    alpha: float = 16.0                # scaling s = alpha / r (alpha / sqrt(r) with --rslora); RaSA: D's start; MoSA, VeRA, VB-LoRA: unused
    dropout: float = 0.0               # dropout probability on the adapter's input only, in [0, 1)
    targets: Optional[str] = None      # comma-separated projection names to adapt; unset: all seven, for mosa q,k,v,up,down
    rslora: bool = False               # rsLoRA scaling s = alpha / sqrt(r)
    num_a: int = 5                     # MASA: N experts A_i per bank
    num_b: int = 1                     # n_B heads B_j per layer, routed per token when > 1 (HydraLoRA; MASA's multi-B ablation)
    share_group: int = 2               # MASA: S consecutive layers share a bank (S = 1: no sharing, the paper's MAE)
    share: str = "a"                   # MASA: what a group shares: a (MASA) | b | ab | none
    agg: str = "sum"                   # MASA: sum (the paper's Eq. 4-5) | router (per-layer softmax over experts)
    rasa_k: Optional[int] = None       # RaSA: k ranks per layer in the shared pool (kL in all), 1 <= k <= r; unset: r // 8, at least 1
    mosa_k: Optional[int] = None       # MoSA: K groups (scalars λ) per weight, 1 <= K <= d_out·d_in; unset: r·(d_out + d_in)
    vera_d_init: float = 0.1           # VeRA: d_init, the start of every entry of d (b starts at 0); the paper's Tables 6c, 8
    vb_num_vectors: int = 2048         # VB-LoRA: h vectors in the one bank shared by every module and layer (its Llama-2 §4.3)
    vb_vector_len: int = 256           # VB-LoRA: b, length of a bank vector (= of a sub-vector); must divide every adapted d_in, d_out
    vb_topk: int = 2                   # VB-LoRA: k bank vectors mixed per sub-vector (softmax over the k largest logits)
    seed: int = 0                      # seed of the adapter initialisation, of MoSA's partition, of VeRA's A, B (same on every DDP rank)

    def __post_init__(self):
        # unset fields take the method's default here, so asdict() and adapter.json always hold explicit values
        if self.r is None:  # VeRA: its Llama instruction-tuning rank (Table 9; peft's default is 256); VB-LoRA: its §4.3
            self.r = {"mosa": 32, "vera": 1024, "vblora": 4}.get(self.adapter, 8)
        if self.targets is None:
            self.targets = ",".join(MOSA_TARGETS if self.adapter == "mosa" else TARGETS)
        if self.rasa_k is None and self.adapter == "rasa" and isinstance(self.r, int):
            self.rasa_k = max(1, self.r // 8)

    @property
    def target_list(self):
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def scaling(self):
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self):
        """Raise ValueError with one line naming the first bad hyperparameter and the fix."""
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}: choose one of {', '.join(ADAPTERS)}")
        for name, sym in (("r", "r"), ("num_a", "N"), ("share_group", "S"), ("num_b", "n_B"), ("vb_num_vectors", "h"),
                          ("vb_vector_len", "b"), ("vb_topk", "k")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({sym}) must be >= 1, got {getattr(self, name)}: pass --{name} 1 or more")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}: pass --alpha 16 (or another positive value)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}: pass --dropout 0.05 for example")
        if not self.target_list:
            raise ValueError("targets is empty: pass --targets q_proj,v_proj (or omit it for all seven)")
        for t in self.target_list:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}: targets must be among {','.join(TARGETS)}")
        if self.share not in ("a", "b", "ab", "none"):
            raise ValueError(f"unknown share {self.share!r}: choose a, b, ab or none")
        if self.agg not in ("sum", "router"):
            raise ValueError(f"unknown agg {self.agg!r}: choose sum or router")
        if self.adapter == "rasa" and not 1 <= self.rasa_k <= self.r:
            raise ValueError(f"rasa_k (k) must be in [1, r={self.r}], got {self.rasa_k}: pass --rasa_k between 1 and "
                             f"{self.r} (unset: r // 8, at least 1)")
        if self.adapter == "mosa":
            if self.mosa_k is not None and self.mosa_k < 1:
                raise ValueError(f"mosa_k (K) must be >= 1, got {self.mosa_k}: pass --mosa_k 1 or more (unset: r·(d_out + d_in))")
            if self.dropout:
                raise ValueError(f"dropout must be 0 for mosa, got {self.dropout}: MoSA folds its update into the weight "
                                 f"(y = (W0 + ΔW) x), so there is no separate adapter input to drop; pass --dropout 0")
        seeds = {"mosa": "the partition", "vera": "the frozen random A and B"}
        if self.adapter in seeds and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2^64) for {self.adapter} (it seeds {seeds[self.adapter]}), got {self.seed}")
        if self.adapter == "vera" and not (self.vera_d_init != 0 and math.isfinite(self.vera_d_init)):
            raise ValueError(f"vera_d_init must be a finite nonzero number, got {self.vera_d_init}: b starts at 0, so d = 0 "
                             f"would give both vectors a zero gradient; pass --vera_d_init 0.1 (the paper's choice)")
        if self.adapter == "vblora" and self.vb_topk > self.vb_num_vectors:
            raise ValueError(f"vb_topk (k={self.vb_topk}) exceeds vb_num_vectors (h={self.vb_num_vectors}): a sub-vector "
                             f"mixes k of the h bank vectors; pass --vb_topk 2 (the paper's) or raise --vb_num_vectors")
        return self


def add_dataclass_args(parser, cls):
    """Add one --flag per field of dataclass `cls` (help text = the field's comment, default = its default).
    A flag already in the parser is skipped, so two dataclasses sharing a field (e.g. seed) share the flag."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # no source file (e.g. defined in a REPL): flags without help text
        src = ""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, re.M))
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = f"--{f.name}"
        if flag in parser._option_string_actions:
            continue
        tp = hints[f.name]
        if type(None) in typing.get_args(tp):  # Optional[X] / X | None -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default_factory() if f.default is MISSING else f.default
        kw = dict(default=default, help=f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%"))
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)
    return parser


def dataclass_from_args(cls, ns):
    """Build dataclass `cls` from the parsed namespace `ns` (fields missing from ns keep their default)."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


# -----------------------------------------------------------------------------
# shared tensors: owned once by the model, reached by many layers


class Shared:
    """Handle to a Parameter (or a frozen buffer) owned by `model.adapter_banks`. Layers store the handle, not
    the tensor, so nn.Module never registers it twice; it is looked up at call time, so it never goes stale
    after .to(), to_empty() or load_state_dict(assign=True)."""

    def __init__(self, owner: nn.Module, key: str):
        self.owner, self.key = owner, key

    def __call__(self):
        return getattr(self.owner, self.key)  # a ParameterDict entry or a buffer of the Banks


class Banks(nn.ModuleDict):
    """`model.adapter_banks`: every tensor several layers share, keyed `<type>.<name>.<group>`, e.g.
    `adapter_banks.q_proj.A.0` = MASA's expert bank of group 0 for q_proj (RaSA: its pool, group 0)."""

    def shared(self, mtype, name, group, make):
        """The Shared handle to tensor (mtype, name, group), created by make() on first request."""
        if mtype not in self:
            self[mtype] = nn.ModuleDict()
        if name not in self[mtype]:
            self[mtype][name] = nn.ParameterDict()
        owner, key = self[mtype][name], str(group)
        if key not in owner:
            owner[key] = nn.Parameter(make())
        return Shared(owner, key)

    def frozen(self, names, make):
        """Shared handles to the frozen tensors `names` (VeRA's random A, B), created together by make() on first
        request as non-persistent buffers (`adapter_banks.vera_A`): not trainable, not in the state dict."""
        if names[0] not in self._buffers:
            for name, t in zip(names, make(), strict=True):
                self.register_buffer(name, t, persistent=False)
        return [Shared(self, name) for name in names]


def val(t):
    """The tensor behind a Parameter or a Shared handle."""
    return t() if isinstance(t, Shared) else t


class Site:
    """What an adapter's constructor needs to know about where it goes: layer index l of L adapted layers,
    module type (q_proj ...), the model's Banks, the seeded init generator (used only while injecting) and
    d_max = (largest d_out, largest d_in) over every adapted Linear (VeRA draws its one A, B pair at that size)."""

    def __init__(self, l, L, mtype, banks, gen, d_max):
        self.l, self.L, self.mtype, self.banks, self.gen, self.d_max = l, L, mtype, banks, gen, d_max


# -----------------------------------------------------------------------------
# adapters


class Adapter(nn.Module):
    """Common base: takes over the frozen base Linear (W0 (d_out, d_in), b), holds s, dropout and merge state,
    and runs the base matmul. Subclasses create their tensors with self.tensor(...) and define
    adapt(x, y) -> y + adapter(x), plus delta_weight() (fp32 ΔW) when mergeable or `not_mergeable` when not.
    An adapter whose update cannot be added to the base output (MoSA folds it into the weight) overrides
    output(x) instead, and computes the whole unmerged output itself."""
    not_mergeable = None  # a one-line reason when the method has no single merged weight

    def __init__(self, base: nn.Linear, acfg: AdapterConfig, site: Site):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # frozen W0 (d_out, d_in), b (d_out,) or None
        self.d_out, self.d_in = base.weight.shape
        self.r, self.s, self.p = acfg.r, acfg.scaling, acfg.dropout
        self.l, self.mtype = site.l, site.mtype  # layer index, module type (q_proj ...)
        self.drop = nn.Dropout(acfg.dropout) if acfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("W0_unmerged", None, persistent=False)  # original W0 while merged

    # -- parameter creation: fp32, on W0's device, drawn from the CPU generator (same on every device)
    def init(self, site, shape, kind):
        """kind: "zeros"; "kaiming" (SPEC's A: U(-1/sqrt(d_in), 1/sqrt(d_in))); ("uniform", bound): U(-bound, bound);
        ("normal", std): N(0, std²)."""
        dev = self.weight.device
        if kind == "zeros":
            return torch.zeros(shape, device=dev)
        if dev.type == "meta":
            return torch.empty(shape, device=dev)
        if kind[0] == "normal":
            return torch.empty(shape).normal_(0, kind[1], generator=site.gen).to(dev)
        bound = 1 / math.sqrt(self.d_in) if kind == "kaiming" else kind[1]  # kaiming_uniform_(a=sqrt(5)), fan_in = d_in
        return torch.empty(shape).uniform_(-bound, bound, generator=site.gen).to(dev)

    def tensor(self, site, name, shape, kind, group=None):
        """Register a private Parameter `name`; or, given a group index, take the group's shared tensor
        from site.banks (created on first use) and keep only a Shared handle to it."""
        if group is None:
            setattr(self, name, nn.Parameter(self.init(site, shape, kind)))
        else:
            setattr(self, name, site.banks.shared(site.mtype, name, group, lambda: self.init(site, shape, kind)))

    # -- forward helpers
    @staticmethod
    def cast(x, dtype):
        # adapter math in the adapter's dtype (fp32), unless autocast already picks the matmul dtype
        return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)

    def project(self, x, A, routers=()):
        """x (n, d_in) -> A x̃ (n, k) and g = softmax(R x) (n, n_R) for each router R (n_R, d_in).
        Routers see the clean x (HydraLoRA's code does the same); with dropout off x̃ = x, so A and every
        router go through ONE matmul against [A; R ...]."""
        if not routers:
            return F.linear(self.cast(self.drop(x), A.dtype), A), []
        if self.training and self.p > 0:
            h, hr = F.linear(self.cast(self.drop(x), A.dtype), A), F.linear(self.cast(x, A.dtype), torch.cat(routers))
        else:
            hr = F.linear(self.cast(x, A.dtype), torch.cat([A, *routers]))  # (n, k + Σ n_R)
            h, hr = hr[:, :A.shape[0]], hr[:, A.shape[0]:]
        return h, [g.softmax(-1) for g in hr.split([R.shape[0] for R in routers], dim=-1)]

    def add_lowrank_(self, y, h, B):
        """y (n, d_out) += s · h Bᵀ in place (h (n, k), B (d_out, k)): one fused addmm when dtypes agree."""
        if y.dtype == h.dtype == B.dtype:
            return y.addmm_(h, B.t(), alpha=self.s)
        return y.add_((F.linear(h, B) * self.s).to(y.dtype))  # mixed precision (bf16 base or autocast)

    def output(self, x):
        """Unmerged output (n, d_out) for x (n, d_in): the frozen base matmul (in the base dtype), then adapt()."""
        return self.adapt(x, F.linear(x, self.weight, self.bias))

    def forward(self, x):
        x2 = x.reshape(-1, self.d_in)  # (n, d_in), n = tokens
        y = F.linear(x2, self.weight, self.bias) if self.merged else self.output(x2)  # (n, d_out)
        return y.view(*x.shape[:-1], self.d_out)

    # -- merge: fp32 compute, rounded once; the original W0 tensor is kept so unmerge restores it bit for bit
    def delta_weight(self):
        raise ValueError(self.not_mergeable)

    def merged_weight(self):
        if self.not_mergeable:
            raise ValueError(self.not_mergeable)
        with torch.no_grad():
            return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def merge(self):
        if not self.merged:
            W = self.merged_weight()
            self.W0_unmerged, self.weight.data, self.merged = self.weight.data, W, True

    def unmerge(self):
        if self.merged:
            self.weight.data, self.W0_unmerged, self.merged = self.W0_unmerged, None, False


class LoRA(Adapter):
    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.tensor(site, "A", (self.r, self.d_in), "kaiming")  # (r, d_in)
        self.tensor(site, "B", (self.d_out, self.r), "zeros")   # (d_out, r), zero: identity at init

    # Hu et al. 2022, Eq. 3: y = W0 x + s B A x̃, s = alpha / r (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))
    def adapt(self, x, y):
        h, _ = self.project(x, self.A)       # (n, r)
        return self.add_lowrank_(y, h, self.B)

    def delta_weight(self):  # ΔW = s B A, fp32 (d_out, d_in)
        return self.s * (self.B @ self.A)


class RowScale(torch.autograd.Function):
    """z = t ⊙ g + c, with g, c (d_out,) broadcast over the rows of t (n, d_out). Saves the OUTPUT z and
    recovers t = (z - c) / g in backward, so where the next op keeps z anyway (attention's v, SwiGLU's
    gate and up) DoRA stores no extra activation (autograd's t * g would keep t as well: +40% memory).
    Needs g != 0; DoRA's g = m / ||V|| starts at 1 (m = ||W0||)."""

    @staticmethod
    def forward(ctx, t, g, c):
        z = t * g if c is None else torch.addcmul(c, t, g)
        ctx.save_for_backward(z, g, c)
        return z

    @staticmethod
    def backward(ctx, gz):
        z, g, c = ctx.saved_tensors
        t = z / g if c is None else (z - c) / g
        return gz * g, (gz * t).sum(0), None if c is None else gz.sum(0)


class DoRA(LoRA):
    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.m = nn.Parameter(self.weight.detach().float().norm(dim=1))  # (d_out,) = ||W0|| per row at init

    def V(self):  # V = W0 + s B A, fp32 (d_out, d_in)
        return torch.addmm(self.weight.float(), self.B, self.A, alpha=self.s)

    # Liu et al. 2024, Eq. 5: W' = m ⊙ V / ||V||_row, V = W0 + s B A; with g = m / ||V|| and the norm detached
    # (DoRA §4.3: a constant in backward, to save memory):  y = g ⊙ (W0 x + s B A x̃) + b
    #                                                          = g ⊙ (W0 x + b + s B A x̃) + (1 - g) ⊙ b.
    # With dropout active we follow peft (whose numerics we match): y = W0 x + b + (g - 1) ⊙ W0 x̃ + g ⊙ s B A x̃.
    def adapt(self, x, y):
        with torch.no_grad():
            norm = self.V().norm(dim=1)                    # (d_out,) ||V|| per output row
        g = self.m / norm                                  # (d_out,) fp32
        if self.training and self.p > 0:
            xd = self.drop(x)                              # one mask for both terms
            lora = F.linear(F.linear(self.cast(xd, self.A.dtype), self.A), self.B) * self.s   # (n, d_out)
            return y + ((g - 1) * F.linear(xd, self.weight) + g * lora).to(y.dtype)
        h, _ = self.project(x, self.A)                     # (n, r)
        t = self.add_lowrank_(y.to(h.dtype), h, self.B)    # (n, d_out) W0 x + b + s B A x
        c = None if self.bias is None else (1 - g) * self.bias
        return RowScale.apply(t, g, c).to(y.dtype)

    def merged_weight(self):  # W' = m ⊙ V / ||V||, fp32, rounded once
        with torch.no_grad():
            V = self.V()
            return ((self.m / V.norm(dim=1))[:, None] * V).to(self.weight.dtype)


class HydraLoRA(Adapter):
    not_mergeable = ("HydraLoRA mixes its B heads per token (g = softmax(R x)), so it has no single merged "
                     "weight: keep it unmerged (export_peft/export_merged do not apply)")

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.n_B = acfg.num_b
        self.tensor(site, "A", (self.r, self.d_in), "kaiming")            # (r, d_in), one per layer
        self.tensor(site, "B", (self.d_out, self.n_B * self.r), "zeros")  # heads side by side: B_j = B[:, j r:(j+1) r]
        self.tensor(site, "R", (self.n_B, self.d_in), "kaiming")          # router, no bias (nn.Linear default init)

    # Tian et al. 2024 (HydraLoRA, Eq. 6-7): y = W0 x + s Σ_j g_j B_j A x̃, g = softmax(R x).
    # Σ_j g_j B_j h = B (g ⊗ h) with B (d_out, n_B r): two matmuls in all ([A; R] x, then B), never n_B.
    def adapt(self, x, y):
        h, (g,) = self.project(x, self.A, [self.R])                  # (n, r), (n, n_B)
        z = (g.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)           # (n, n_B r) = g ⊗ h
        return self.add_lowrank_(y, z, self.B)


class MASA(Adapter):
    """Layers are cut into groups of S (k = l // S, the last smaller). Each group owns, per module type, a
    bank of N experts A_i^(k) stacked (N, r, d_in); each layer its B^(l) (d_out, n_B r). `share` decides
    which of A / B is per group (in model.adapter_banks) or per layer. Trainable params per module type:
        G_A·N·r·d_in + G_B·n_B·r·d_out  (+ L·N·d_in with agg=router) (+ L·n_B·d_in when n_B > 1)
    with G_X = ceil(L/S) if X is shared else L (SPEC's formula is share=a, n_B=1)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.N, self.n_B, self.agg = acfg.num_a, acfg.num_b, acfg.agg
        k = site.l // acfg.share_group  # group of layer l
        self.tensor(site, "A", (self.N, self.r, self.d_in), "kaiming", k if "a" in acfg.share else None)
        self.tensor(site, "B", (self.d_out, self.n_B * self.r), "zeros", k if "b" in acfg.share else None)
        if self.agg == "router":
            self.tensor(site, "R", (self.N, self.d_in), "kaiming")       # per-layer router over experts
        if self.n_B > 1:
            self.tensor(site, "R_B", (self.n_B, self.d_in), "kaiming")   # per-layer router over B heads
        if self.agg == "router":
            self.not_mergeable = "MASA with agg=router mixes experts per token: not mergeable (use agg=sum)"
        elif self.n_B > 1:
            self.not_mergeable = "MASA with num_b > 1 mixes B heads per token: not mergeable (use num_b=1)"

    # Dong et al. 2025 (MASA), Eq. 4-5:  y = W0 x + s B^(l) (Σ_i A_i^(k)) x̃                  (agg = "sum")
    # agg = "router":                    y = W0 x + s B^(l) Σ_i g_i A_i^(k) x̃, g = softmax(R^(l) x)
    # num_b > 1 (HydraLoRA-style heads): s Σ_j g'_j B_j (...), g' = softmax(R_B^(l) x)
    def adapt(self, x, y):
        A, B = val(self.A), val(self.B)                           # (N, r, d_in), (d_out, n_B r)
        routers = ([self.R] if self.agg == "router" else []) + ([self.R_B] if self.n_B > 1 else [])
        if self.agg == "sum":  # sum the bank ONCE (r, d_in), then one rank-r matmul: never N matmuls
            h, gates = self.project(x, A.sum(0), routers)        # (n, r)
        else:                  # all experts in one stacked matmul, then mix by the router
            h, gates = self.project(x, A.flatten(0, 1), routers)  # (n, N r)
            g, gates = gates[0], gates[1:]                        # (n, N)
            h = torch.einsum("nk,nkr->nr", g, h.unflatten(-1, (self.N, self.r)))  # (n, r)
        if self.n_B > 1:
            h = (gates[0].unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)            # (n, n_B r) = g' ⊗ h
        return self.add_lowrank_(y, h, B)

    def delta_weight(self):  # ΔW = s B^(l) Σ_i A_i^(k), fp32 (d_out, d_in)
        return self.s * (val(self.B) @ val(self.A).sum(0))


class RaSA(Adapter):
    """Per layer a private pair A_l (r-k, d_in), B_l (d_out, r-k); per module type ONE pool A_S (kL, d_in),
    B_S (d_out, kL), kept in model.adapter_banks as group 0 (the same machinery as MASA's banks) and used in
    full by every layer; per layer a diagonal D_l ((r-k) + kL,) = [D^priv; D^shared]. With k = r there is
    no private pair (D_l = D^shared). Trainable params per module type: L·r·(d_in + d_out) + L·(r - k + kL)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.k, self.kL = acfg.rasa_k, acfg.rasa_k * site.L
        self.rp = self.r - self.k  # private rank r - k
        self.s = 1.0               # no alpha / r factor: alpha enters through D's start (SPEC.md)
        if self.rp:
            self.tensor(site, "A", (self.rp, self.d_in), "kaiming")              # A_l (r-k, d_in)
            self.tensor(site, "B", (self.d_out, self.rp), "zeros")               # B_l (d_out, r-k)
        self.tensor(site, "A_S", (self.kL, self.d_in), "kaiming", group=0)       # A_S (kL, d_in), once per type
        self.tensor(site, "B_S", (self.d_out, self.kL), "zeros", group=0)        # B_S (d_out, kL), zero
        D = [torch.full((self.rp,), acfg.alpha / (2 * self.rp))] if self.rp else []
        D.append(torch.full((self.kL,), acfg.alpha / (2 * self.kL)))
        self.D = nn.Parameter(torch.cat(D).to(self.weight.device))                # D_l (r-k + kL,) fp32

    # He et al. 2025 (RaSA), as SPEC.md states it:
    #     y = W0 x + B_l (D_l^priv ⊙ A_l x̃) + B_S (D_l^shared ⊙ A_S x̃),  x̃ = dropout(x), one mask for both.
    # Two matmul pairs, each added in place; the weights are never concatenated per call ([A_l; A_S] would
    # copy (r-k+kL)·d_in floats every step, and the backward would split the gradient again).
    def adapt(self, x, y):
        A_S, B_S = val(self.A_S), val(self.B_S)
        xd = self.cast(self.drop(x), A_S.dtype)                      # (n, d_in) x̃
        Dp, Ds = self.D.split([self.rp, self.kL])                    # (r-k,), (kL,) views
        if self.rp:
            y = self.add_lowrank_(y, F.linear(xd, self.A) * Dp, self.B)   # += B_l (D^priv ⊙ A_l x̃), (n, r-k)
        return self.add_lowrank_(y, F.linear(xd, A_S) * Ds, B_S)          # += B_S (D^shared ⊙ A_S x̃), (n, kL)

    def delta_weight(self):  # ΔW = B_l diag(D^priv) A_l + B_S diag(D^shared) A_S, fp32 (d_out, d_in)
        Dp, Ds = self.D.split([self.rp, self.kL])
        dW = (val(self.B_S) * Ds) @ val(self.A_S)
        return torch.addmm(dW, self.B * Dp, self.A) if self.rp else dW


class MoSA(Adapter):
    """One trainable scalar λ_k per group of a balanced random partition of W0's N = d_out·d_in entries:
    ΔW[i, j] = λ[g(i, j)]. The partition (π and the group-id map g, int32 where they fit) comes from
    kernels.mosa_partition, built from acfg.seed, cached ONCE per (d_out, d_in, K, seed, device) and looked up
    at call time: every layer and module of that shape shares it, it is not a buffer (not copied per layer by
    .to(), not in the state dict) and follows the model to any device. Trainable params per module: K."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        N = self.d_out * self.d_in
        self.K = acfg.mosa_k or self.r * (self.d_out + self.d_in)  # SPEC: K = r (h + d), a rank-r LoRA's budget
        if not 1 <= self.K <= N:
            raise ValueError(f"mosa: K={self.K} groups outside [1, d_out·d_in={N}] for {site.mtype} "
                             f"({self.d_out}x{self.d_in}): lower --r or pass --mosa_k between 1 and {N}")
        self.seed = acfg.seed
        self.tensor(site, "lam", (self.K,), "zeros")  # λ (K,) fp32, zero: identity at init
        if self.weight.device.type != "meta":  # eagerly, now: torch.compile can look these up but not make them
            self.partition()                       # built once per shape, then shared
            kernels.pick_form(self.weight.device)  # the reduction form, measured once per device type

    def partition(self):
        """(π (N,), g (d_out, d_in)) for this weight's shape, from kernels' cache (shared, read-only)."""
        return kernels.mosa_partition(self.d_out, self.d_in, self.K, self.seed, self.weight.device)

    # Wang et al. 2026 (MoSA), as SPEC.md states it: y = (W0 + ΔW) x + b, ΔW[i, j] = λ[g(i, j)].
    # ONE matmul against W0 + ΔW (built in fp32, rounded once to W0's dtype) replaces the base matmul;
    # kernels.mosa_linear's backward rebuilds W0 + ΔW rather than keeping it, and reduces the dense weight
    # gradient per group in fp32 (index_add_ or the permutation form, whichever pick_form measured faster).
    def output(self, x):
        perm, g = self.partition()
        return kernels.mosa_linear(x, self.weight, self.bias, self.lam, g, perm)    # (n, d_out)

    def delta_weight(self):  # ΔW = λ[g], fp32 (d_out, d_in)
        return kernels.mosa_delta(self.lam, self.partition()[1])

    def merged_weight(self):  # the forward's own W0 + ΔW (one rounding), so merged == unmerged bit for bit
        with torch.no_grad():
            return kernels.mosa_weight(self.weight, self.lam, self.partition()[1])

    def partition_meta(self):
        """What adapter.json records of the partition, so a reload can prove it rebuilt the same one."""
        perm, g = self.partition()
        return dict(shape=[self.d_out, self.d_in], K=self.K, seed=self.seed,
                    checksum=kernels.partition_checksum(perm, g))


def vera_projections(r, d_out, d_in, seed):
    """VeRA's frozen pair, fp32 on the CPU, drawn from a generator seeded with `seed` alone (so a reload rebuilds
    it): A (r, d_in), then B (d_out, r), each Kaiming-uniform with gain sqrt(2) (a = 0) over its own fan-in,
    U(-sqrt(6/fan_in), sqrt(6/fan_in)): the paper's "Kaiming initialisation", drawn exactly as peft's VeRA
    draws it from projection_prng_key, so the same seed gives peft's matrices bit for bit. (The paper, §3.3 and
    Table 8: "Kaiming uniform"; not SPEC's a = sqrt(5) bound for A-like matrices: these are not trained LoRA
    factors but fixed random projections.)"""
    gen = torch.Generator().manual_seed(seed)

    def kaiming(shape):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # peft's expression, for the same float
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return kaiming((r, d_in)), kaiming((d_out, r))


def checksum(tag, *tensors):
    """sha256 (first 16 hex digits) of tag, the shapes and the fp32 little-endian bytes of tensors."""
    digest = hashlib.sha256(f"{tag} {[list(t.shape) for t in tensors]}\n".encode())
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()[:16]


class VeRAProduct(torch.autograd.Function):
    """z = (h ⊙ d)(Λ_b B)ᵀ for h = A x̃ (n, r), d (r,), b (d_out,), frozen B (d_out, r). Saves h only: h ⊙ d and
    Λ_b B are rebuilt in backward, where autograd would keep both, i.e. another (n, r) and a (d_out, r) tensor per
    module (at r = 1024 on an 8B model, ~6 GB). Backward in d's dtype (fp32) whatever the forward's (autocast)."""

    @staticmethod
    def forward(ctx, h, d, b, B):
        ctx.save_for_backward(h, d, b, B)
        return F.linear(h * d, B * b[:, None])           # (n, d_out)

    @staticmethod
    def backward(ctx, gz):
        h, d, b, B = ctx.saved_tensors
        gz, hf = gz.to(d.dtype), h.to(d.dtype)           # the adapter's dtype (fp32), whatever autocast used
        gu = gz @ (B * b[:, None])                        # (n, r)     dL/d(h ⊙ d)
        G = gz.t() @ (hf * d)                             # (d_out, r) dL/d(Λ_b B)
        return (gu * d).to(h.dtype), (gu * hf).sum(0), (G * B).sum(1), None


class VeRA(Adapter):
    """ONE frozen random pair for the whole model, A (r, d_in_max), B (d_out_max, r) at the largest adapted
    shapes, kept in model.adapter_banks as non-persistent buffers (vera_A, vera_B); every module uses its
    top-left slice A[:, :d_in], B[:d_out, :]. The paper (§3) freezes "a single pair ... shared across all
    adapted layers" and does not say how layers of different shapes share it; peft draws the largest shapes
    and slices, which we follow (not one pair per shape), so q, k, v, o, gate, up, down all share one pair.
    The pair is not saved: save_adapter records seed and checksum, load_adapter rebuilds it from the seed and
    refuses a checksum mismatch (the paper, §3.2: the pair "can be regenerated from a ... seed"). Trainable per
    module: d (r,) = d_init, b (d_out,) = 0 (§3.3), so L·(r + d_out) per type (§3.2: L_tuned·(d_model + r)).
    No alpha / r factor (the paper and peft have none: d and b carry the scale)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.s, self.seed = 1.0, acfg.seed
        (d_out_max, d_in_max), dev = site.d_max, self.weight.device
        if dev.type == "meta":
            pair = lambda: (torch.empty(self.r, d_in_max, device=dev), torch.empty(d_out_max, self.r, device=dev))
        else:
            pair = lambda: [t.to(dev) for t in vera_projections(self.r, d_out_max, d_in_max, acfg.seed)]
        self.A, self.B = site.banks.frozen(("vera_A", "vera_B"), pair)  # A (r, d_in_max), B (d_out_max, r), once
        self.d = nn.Parameter(torch.full((self.r,), acfg.vera_d_init, device=dev))  # (r,) Λ_d's diagonal, d_init
        self.tensor(site, "b", (self.d_out,), "zeros")                              # (d_out,) Λ_b's diagonal, zero

    def slices(self):  # this module's views of the shared pair: A (r, d_in), B (d_out, r)
        return val(self.A)[:, :self.d_in], val(self.B)[:self.d_out]

    # Kopiczko et al. 2024 (VeRA), Eq. 2 (§3.1):  y = W0 x + Λ_b B Λ_d A x̃,  Λ = diag, A and B frozen.
    # Computed as (d ⊙ A x̃)(Λ_b B)ᵀ by VeRAProduct, which keeps only A x̃ (n, r) for backward; peft keeps
    # A x̃ and the (n, d_out) product B(d ⊙ A x̃) (for b's gradient).
    def adapt(self, x, y):
        A, B = self.slices()
        h, _ = self.project(x, A)                                       # (n, r) A x̃
        return y.add_(VeRAProduct.apply(h, self.d, self.b, B).to(y.dtype))

    def delta_weight(self):  # ΔW = Λ_b B Λ_d A, fp32 (d_out, d_in)
        A, B = self.slices()
        return (self.b[:, None] * B) @ (self.d[:, None] * A)

    def projection_meta(self):
        """What adapter.json records of the frozen pair, so a reload can prove it rebuilt the same one."""
        A, B = val(self.A), val(self.B)
        return dict(A=list(A.shape), B=list(B.shape), seed=self.seed, checksum=checksum("vera-projections-v1", A, B))


class VBLoRA(Adapter):
    """ONE vector bank (h, b) for the whole model, in model.adapter_banks (`adapter_banks.all.bank.0`: shared by
    all module types and layers). Per module, logits_A (r, d_in/b, h) and logits_B (d_out/b, r, h): one row of
    h logits per sub-vector. A's rows (length d_in) and B's columns (length d_out), i.e. both vectors of each
    of the r rank-one components (the paper's Eq. 3.1), are cut into sub-vectors of length b (Eq. 3.2); each
    sub-vector is the softmax-weighted sum of the k bank vectors with the largest logits (Eq. 3.3). Layout as
    peft's vblora (the authors' own, per their README; their Algorithm 1 orders logits_A (d_in/b, r, h)):
    logits_A[i, j] builds A[i, j b:(j+1) b], logits_B[t, i] builds B[t b:(t+1) b, i]. Init as in §4.1 and peft:
    bank U(-0.02, 0.02), logits N(0, 0.01) in (mean, variance), i.e. std 0.1. So ΔW = B A != 0 at step 0:
    unlike LoRA, VB-LoRA does NOT start at the base model. No alpha / r factor (neither the paper nor peft).
    Trainable: h·b once, plus r·h·(d_in + d_out)/b per module. Stored after training (§3.4, what the paper
    counts): h·b plus, per sub-vector, its k indices and k - 1 free mixing weights (see param_report)."""
    BANK_BOUND, LOGITS_STD = 0.02, 0.1  # §4.1 and peft's init_vector_bank_bound, init_logits_std

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.s, self.h, self.b, self.k = 1.0, acfg.vb_num_vectors, acfg.vb_vector_len, acfg.vb_topk
        for side, dim in (("d_in", self.d_in), ("d_out", self.d_out)):
            if dim % self.b:
                raise ValueError(f"vblora: {side}={dim} of {site.mtype} is not a multiple of vb_vector_len b={self.b}: "
                                 f"pass a --vb_vector_len that divides every adapted d_in and d_out (256 for Llama 3)")
        # the bank is group 0 of the pseudo-type "all": adapter_banks.all.bank.0, created by the first module
        bank = lambda: self.init(site, (self.h, self.b), ("uniform", self.BANK_BOUND))   # (h, b)
        self.bank = site.banks.shared("all", "bank", 0, bank)
        self.tensor(site, "logits_A", (self.r, self.d_in // self.b, self.h), ("normal", self.LOGITS_STD))   # (r, d_in/b, h)
        self.tensor(site, "logits_B", (self.d_out // self.b, self.r, self.h), ("normal", self.LOGITS_STD))  # (d_out/b, r, h)

    def mix(self, logits):
        """(..., h) logits -> (..., b) sub-vectors Σ_j softmax(top-k logits)_j · bank[top-k index_j]: the paper's
        top-k admixture module (Eq. 3.3). Only the k selected logits of a row receive a gradient."""
        top, idx = logits.topk(self.k, dim=-1)                                    # (..., k), (..., k)
        return torch.einsum("...k,...kb->...b", top.softmax(-1), val(self.bank)[idx])

    def AB(self):  # A (r, d_in), B (d_out, r), fp32, composed from the bank
        A = self.mix(self.logits_A).flatten(1)                                    # (r, d_in/b, b) -> (r, d_in)
        B = self.mix(self.logits_B).transpose(1, 2).flatten(0, 1)                 # (d_out/b, b, r) -> (d_out, r)
        return A, B

    # Li et al. 2024 (VB-LoRA), §3.1-3.3: y = W0 x + B A x̃, A and B composed from the bank (Eq. 3.1-3.3).
    def adapt(self, x, y):
        A, B = self.AB()
        h, _ = self.project(x, A)            # (n, r)
        return self.add_lowrank_(y, h, B)

    def delta_weight(self):  # ΔW = B A, fp32 (d_out, d_in)
        A, B = self.AB()
        return B @ A


ADAPTERS = {"lora": LoRA, "dora": DoRA, "hydralora": HydraLoRA, "masa": MASA, "rasa": RaSA, "mosa": MoSA,
            "vera": VeRA, "vblora": VBLoRA}

# -----------------------------------------------------------------------------
# injection and reporting


def inject(model, acfg):
    """Wrap every nn.Linear whose name ends in one of acfg's targets with ADAPTERS[acfg.adapter], freeze every
    base parameter, attach `model.adapter_banks` and `model.adapter_config`; return the trainable params
    (each once). Inject after the base weights are loaded: DoRA's m starts at the row norms of W0."""
    acfg.validate()
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("model already has an adapter: inject into a freshly loaded base model")
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in acfg.target_list]
    if not found:
        raise ValueError(f"no module matched targets {acfg.targets!r}: the model has no nn.Linear with those names")
    layer = lambda n: int(m.group(1)) if (m := re.search(r"(?:^|\.)(\d+)\.", n)) else 0  # model.layers.<l>.
    L = 1 + max(layer(n) for n, _ in found)
    banks, gen = Banks(), torch.Generator().manual_seed(acfg.seed)
    d_max = tuple(max(m.weight.shape[i] for _, m in found) for i in (0, 1))  # (largest d_out, largest d_in)
    # every adapter is built before the model is touched, so a constructor that refuses its shape (MoSA's K,
    # VB-LoRA's b) leaves the base model as it was
    wrapped = []
    for name, base in found:
        site = Site(layer(name), L, name.rsplit(".", 1)[-1], banks, gen, d_max)
        wrapped.append((name, ADAPTERS[acfg.adapter](base, acfg, site)))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, adapter in wrapped:
        parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        setattr(model.get_submodule(parent), leaf, adapter)
    model.adapter_banks = banks
    model.adapter_config = acfg
    return [p for p in model.parameters() if p.requires_grad]


def adapter_params(model):
    """{state-dict name: Parameter} of every adapter tensor, each once (banks under adapter_banks.*)."""
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, Adapter):
            out.update({f"{mname}.{n}": p for n, p in mod.named_parameters(recurse=False) if n not in ("weight", "bias")})
    out.update({f"adapter_banks.{n}": p for n, p in getattr(model, "adapter_banks", Banks()).named_parameters()})
    return out


def _mtype(name):
    return next((part for part in name.split(".") if part in TARGETS), "other")


def param_report(model):
    """{"trainable", "base", "percent" (100·trainable/(base+trainable), the papers' "Params %"), "by_type"}; for
    MASA also "masa": both counts, the equations' (agg=sum, no router) and the paper's (router counted); for
    MoSA also "mosa": the partitions (one per distinct shape) and the bytes of their index tensors."""
    ad = adapter_params(model)
    ids = {id(p) for p in ad.values()}
    base = sum(p.numel() for p in model.parameters() if id(p) not in ids)  # tied embeddings count once
    trainable = sum(p.numel() for p in ad.values())
    pct = lambda t: 100.0 * t / (base + t)
    by_type = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Adapter):
            e = by_type.setdefault(_mtype(name), dict(modules=0, d_in=mod.d_in, d_out=mod.d_out, trainable=0))
            e["modules"] += 1
    all_types = 0  # tensors shared by every module type (VB-LoRA's bank): in the total, in no by_type row
    for name, p in ad.items():
        if _mtype(name) in by_type:
            by_type[_mtype(name)]["trainable"] += p.numel()
        else:
            all_types += p.numel()
    rep = dict(trainable=trainable, base=base, percent=pct(trainable), by_type=by_type)
    if all_types:
        rep["all_types"] = dict(trainable=all_types, note="tensors shared by every module type (VB-LoRA's vector bank)")
    acfg = getattr(model, "adapter_config", None)
    if acfg is not None and acfg.adapter == "masa":
        router = sum(m.N * m.d_in for m in model.modules() if isinstance(m, MASA))  # L·N·d_in per type
        t_sum = trainable - (router if acfg.agg == "router" else 0)
        rep["masa"] = dict(
            equations_sum=dict(trainable=t_sum, percent=pct(t_sum)),
            paper_router=dict(trainable=t_sum + router, percent=pct(t_sum + router)),
            note="the paper's Params % (its Tables 1, 3, 5, 6) count a per-layer N x d_in router per module "
                 "(paper_router); its equations (agg=sum) have none (equations_sum)")
    if acfg is not None and acfg.adapter == "mosa":
        parts = {}
        for name, m in model.named_modules():
            if isinstance(m, MoSA):
                e = parts.setdefault((m.d_out, m.d_in, m.K), dict(
                    shape=[m.d_out, m.d_in], K=m.K, modules=0,
                    index_bytes=kernels.partition_nbytes(m.d_out, m.d_in, m.K)))  # π and g, int32 where they fit
                e["modules"] += 1
        rep["mosa"] = dict(partitions=list(parts.values()), index_bytes=sum(e["index_bytes"] for e in parts.values()),
                           note="index tensors (π and the group-id map g) of one partition per distinct shape, shared "
                                "by every module of that shape: neither trainable nor saved, held once per device")
    if acfg is not None and acfg.adapter == "vera":
        A, B = model.adapter_banks.vera_A, model.adapter_banks.vera_B
        rep["vera"] = dict(A=list(A.shape), B=list(B.shape), frozen=A.numel() + B.numel(),
                           note="one frozen random pair at the largest adapted shapes, sliced by every module: "
                                "neither trainable nor saved (rebuilt from the seed; checksum in adapter.json)")
    if acfg is not None and acfg.adapter == "vblora":
        mods = [m for m in model.modules() if isinstance(m, VBLoRA)]
        n_sub = sum(m.logits_A.shape[:-1].numel() + m.logits_B.shape[:-1].numel() for m in mods)  # sub-vectors
        h, k = acfg.vb_num_vectors, acfg.vb_topk
        index = 0.25 if h <= 2**8 else 0.5 if h <= 2**16 else 1.0  # uint8 / uint16 / uint32, in float32 units
        stored = all_types + n_sub * (k - 1 + k * index)
        rep["vblora"] = dict(bank=all_types, logits=trainable - all_types, sub_vectors=n_sub,
                             stored=dict(params=stored, percent=pct(stored)),
                             note="trainable = the bank + every logit (what AdamW updates and save_adapter writes); "
                                  "stored = the paper's count (§3.4) for a finished adapter, in float32 equivalents: "
                                  "the bank plus, per sub-vector, k - 1 free mixing weights and k indices stored as "
                                  "the smallest unsigned int that holds h (h·b + 3·n_sub/2 for k = 2, h <= 256)")
    return rep


# -----------------------------------------------------------------------------
# merge, save, load, export


def _adapters(model):
    if getattr(model, "adapter_config", None) is None:
        raise ValueError("model has no adapter: call inject(model, acfg) or load_adapter(model, dir) first")
    return [m for m in model.modules() if isinstance(m, Adapter)]


def merge(model):
    """W0 <- merged weight in every adapted module (fp32 compute, rounded once to W0's dtype). The original
    W0 tensors are kept (one extra copy of each adapted weight) so unmerge() restores them bit for bit."""
    mods = _adapters(model)
    for m in mods:  # refuse before touching anything
        if m.not_mergeable:
            raise ValueError(m.not_mergeable)
    for m in mods:
        m.merge()


def unmerge(model):
    for m in _adapters(model):
        m.unmerge()


def save_adapter(model, out_dir):
    """Write out_dir/adapter.safetensors (adapter tensors only, fp32) and out_dir/adapter.json (method,
    every hyperparameter, the base config's fingerprint), each atomically, weights first."""
    _adapters(model)
    acfg, out = model.adapter_config, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: p.detach().cpu().contiguous() for k, p in adapter_params(model).items()}
    meta = dict(format="nanomasa-adapter-v1", method=acfg.adapter, config=asdict(acfg),
                base_fingerprint=model.config.fingerprint(), base_layers=model.config.n_layers,
                base_hidden=model.config.hidden_size)
    if acfg.adapter == "mosa":
        meta["partitions"] = _partitions(model)
    if acfg.adapter == "vera":
        meta["vera_projection"] = _vera_projection(model)
    write_atomic(out / "adapter.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    write_atomic(out / "adapter.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def _partitions(model):
    """MoSA: [partition_meta() of each distinct (shape, K)] (a checksum is computed once per partition)."""
    parts = {}
    for m in model.modules():
        if isinstance(m, MoSA) and (m.d_out, m.d_in, m.K) not in parts:
            parts[m.d_out, m.d_in, m.K] = m.partition_meta()
    return list(parts.values())


def _vera_projection(model):
    """VeRA: projection_meta() of the model's one frozen pair (shapes, seed, checksum)."""
    return next(m for m in model.modules() if isinstance(m, VeRA)).projection_meta()


def load_adapter(model, adapter_dir):
    """Inject the adapter described by adapter_dir/adapter.json into `model` and load its weights exactly.
    Refuses a model whose config fingerprint differs from the one the adapter was trained on, and a MoSA
    partition or VeRA's frozen pair rebuilt from the saved seed whose checksum differs from the saved one."""
    d = Path(adapter_dir)
    for f in ("adapter.json", "adapter.safetensors"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"no {f} in {d}: pass a directory written by save_adapter")
    meta = json.loads((d / "adapter.json").read_text())
    fp = model.config.fingerprint()
    if meta["base_fingerprint"] != fp:
        raise ValueError(f"adapter in {d} was trained on a base with config fingerprint {meta['base_fingerprint']} "
                         f"(L={meta.get('base_layers')}, d={meta.get('base_hidden')}), this model's is {fp}: "
                         f"load the base model it was trained on")
    unknown = set(meta["config"]) - {f.name for f in fields(AdapterConfig)}
    if unknown:
        raise ValueError(f"adapter.json has unknown fields {sorted(unknown)}: it was written by a newer nanoMASA")
    acfg = AdapterConfig(**meta["config"])
    if getattr(model, "adapter_config", None) is not None:
        if asdict(model.adapter_config) != asdict(acfg):
            raise ValueError(f"model already has a different adapter ({model.adapter_config.adapter}): load into a fresh base")
        _load_into(model, acfg, meta, d)
        return acfg
    requires_grad = [p.requires_grad for p in model.parameters()]
    inject(model, acfg)
    try:
        _load_into(model, acfg, meta, d)
    except Exception:  # nothing half-done: put the plain base back as it was
        for name, m in list(model.named_modules()):
            if isinstance(m, Adapter):
                parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
                lin = nn.Linear(m.d_in, m.d_out, bias=m.bias is not None, device="meta")
                lin.weight, lin.bias = m.weight, m.bias
                setattr(model.get_submodule(parent), leaf, lin)
        del model.adapter_banks, model.adapter_config
        for p, g in zip(model.parameters(), requires_grad):
            p.requires_grad_(g)
        raise
    return acfg


def _load_into(model, acfg, meta, d):
    """Check adapter_dir's partitions (MoSA) or projections (VeRA), keys and shapes against the injected `model`,
    then copy the weights."""
    if acfg.adapter == "mosa":  # λ_k means nothing on another partition: prove we rebuilt the saved one
        key = lambda p: (tuple(p["shape"]), p["K"], p["seed"])
        saved = {key(p): p["checksum"] for p in meta.get("partitions", [])}
        for p in _partitions(model):
            if saved.get(key(p)) != p["checksum"]:
                raise ValueError(f"MoSA partition {p['shape'][0]}x{p['shape'][1]} K={p['K']} rebuilt from seed {p['seed']} "
                                 f"has checksum {p['checksum']}, {d / 'adapter.json'} says {saved.get(key(p))}: this "
                                 f"kernels.py builds another partition; load with the nanoMASA version that trained it")
    if acfg.adapter == "vera":  # d and b mean nothing on other random matrices: prove we rebuilt the saved pair
        p, saved = _vera_projection(model), meta.get("vera_projection", {})
        if saved.get("checksum") != p["checksum"]:
            raise ValueError(f"VeRA projections A {p['A']}, B {p['B']} rebuilt from seed {p['seed']} have checksum "
                             f"{p['checksum']}, {d / 'adapter.json'} says {saved.get('checksum')}: this torch draws other "
                             f"random matrices; load with the torch and nanoMASA versions that trained it")
    sd, own = load_file(str(d / "adapter.safetensors")), adapter_params(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter.safetensors does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, p in own.items():  # every check before the first copy
        if sd[k].shape != p.shape:
            raise ValueError(f"{k}: expected shape {tuple(p.shape)}, file has {tuple(sd[k].shape)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


def export_peft(model, out_dir):
    """LoRA / DoRA in PEFT's format: adapter_model.safetensors + adapter_config.json, loadable with
    peft.PeftModel.from_pretrained(transformers_model, out_dir) with no missing or unexpected keys."""
    mods = _adapters(model)
    acfg = model.adapter_config
    if acfg.adapter not in ("lora", "dora"):
        raise ValueError(f"export_peft supports lora and dora; PEFT has no {acfg.adapter}: use export_merged "
                         f"(mergeable adapters) or save_adapter")
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            sd[f"base_model.model.{name}.lora_A.weight"] = m.A.detach().cpu().contiguous()
            sd[f"base_model.model.{name}.lora_B.weight"] = m.B.detach().cpu().contiguous()
            if isinstance(m, DoRA):
                sd[f"base_model.model.{name}.lora_magnitude_vector"] = m.m.detach().cpu().contiguous()
    alpha = int(acfg.alpha) if float(acfg.alpha).is_integer() else acfg.alpha
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=acfg.r, lora_alpha=alpha, lora_dropout=acfg.dropout,
               target_modules=sorted({_mtype(n) for n, m in model.named_modules() if m in mods}),
               use_rslora=acfg.rslora, use_dora=acfg.adapter == "dora", bias="none", fan_in_fan_out=False,
               init_lora_weights=True, inference_mode=True, modules_to_save=None, base_model_name_or_path=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "adapter_model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    write_atomic(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))


def export_merged(model, out_dir):
    """A plain Hugging Face checkpoint (config.json + model.safetensors, base dtype) with every adapter
    merged (fp32 compute, rounded once), loadable by transformers. The model itself is left unchanged."""
    mods = _adapters(model)
    for m in mods:
        if m.not_mergeable:
            raise ValueError(m.not_mergeable)
    skip = set(adapter_params(model))
    sd = {k: v for k, v in model.state_dict().items() if k not in skip}
    for name, m in model.named_modules():
        if isinstance(m, Adapter) and not m.merged:
            sd[f"{name}.weight"] = m.merged_weight()
    model.save_pretrained(out_dir, sd)


# -----------------------------------------------------------------------------
# command line: parameter report on the meta device

_LLAMA3 = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
               bos_token_id=128000, eos_token_id=128001)
_ROPE31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
PRESETS = {  # published config.json shapes (Hugging Face Hub)
    "llama3-8b": _LLAMA3,
    "llama3.1-8b": {**_LLAMA3, "rope_scaling": _ROPE31, "max_position_embeddings": 131072,
                    "eos_token_id": [128001, 128008, 128009]},
    "llama3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                    "num_attention_heads": 24, "head_dim": 128, "tie_word_embeddings": True,
                    "rope_scaling": {**_ROPE31, "factor": 32.0}, "max_position_embeddings": 131072},
    "llama2-7b": dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096,
                       bos_token_id=1, eos_token_id=2),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
                       tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
}


def meta_model(spec):
    """Transformer on the meta device (shapes only, no memory) from a preset name, a dir or a config.json."""
    if spec in PRESETS:
        cfg = ModelConfig.from_hf_dict(PRESETS[spec], where=f"preset {spec}")
    elif Path(spec).exists():
        cfg = ModelConfig.from_hf(spec)
    else:
        raise FileNotFoundError(f"no config.json at {spec}: pass a preset ({', '.join(PRESETS)}), a model dir or a config.json")
    with torch.device("meta"):
        return Transformer(cfg)


def format_report(rep, spec, acfg):
    lines = [f"{spec} + {acfg.adapter}: " + " ".join(f"{k}={v}" for k, v in asdict(acfg).items() if k != "adapter"),
             f"{'module':<10} {'count':>5} {'d_in x d_out':>13} {'trainable':>13}"]
    for t, e in rep["by_type"].items():
        lines.append(f"{t:<10} {e['modules']:>5} {str(e['d_in']) + ' x ' + str(e['d_out']):>13} {e['trainable']:>13,}")
    if "all_types" in rep:
        lines.append(f"{'all types':<10} {'':>5} {'(shared)':>13} {rep['all_types']['trainable']:>13,}")
    lines.append(f"trainable {rep['trainable']:,} | base {rep['base']:,} | "
                 f"params % = 100·trainable/(base+trainable) = {rep['percent']:.4f}%")
    if "masa" in rep:
        m = rep["masa"]
        lines.append(f"MASA equations (agg=sum, no router): {m['equations_sum']['trainable']:,} "
                     f"({m['equations_sum']['percent']:.4f}%); paper's count (router counted): "
                     f"{m['paper_router']['trainable']:,} ({m['paper_router']['percent']:.4f}%)")
    if "mosa" in rep:
        parts = ", ".join(f"{p['shape'][0]}x{p['shape'][1]} K={p['K']:,} ({p['modules']} modules, "
                          f"{p['index_bytes'] / 2**20:,.1f} MiB)" for p in rep["mosa"]["partitions"])
        lines.append(f"MoSA partition index memory (not trainable, one per shape): "
                     f"{rep['mosa']['index_bytes'] / 2**20:,.1f} MiB = {parts}")
    if "vera" in rep:
        v = rep["vera"]
        lines.append(f"VeRA frozen random A {v['A'][0]}x{v['A'][1]} and B {v['B'][0]}x{v['B'][1]}, one pair sliced by every "
                     f"module: {v['frozen']:,} values, not trainable, not saved (rebuilt from seed {acfg.seed})")
    if "vblora" in rep:
        v = rep["vblora"]
        lines.append(f"VB-LoRA trainable = bank {v['bank']:,} + logits {v['logits']:,}; stored once trained (the paper's "
                     f"count, float32 equivalents: bank + {v['sub_vectors']:,} sub-vectors x (k indices + k-1 weights)): "
                     f"{v['stored']['params']:,.0f} ({v['stored']['percent']:.4f}%)")
    return "\n".join(lines)


def main(argv=None):
    ap = ArgParser(description="Trainable-parameter report of an adapter on a model built on the "
                                             "meta device (no weights are read).")
    ap.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}), model dir or config.json")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_dataclass_args(ap, AdapterConfig)
    a = ap.parse_args(argv)
    try:
        acfg = dataclass_from_args(AdapterConfig, a)
        model = meta_model(a.model)
        inject(model, acfg)
        rep = param_report(model)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(dict(model=a.model, adapter=asdict(acfg), **rep), indent=2) if a.json else format_report(rep, a.model, acfg))


if __name__ == "__main__":
    main()
