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
  prompt_tuning  Lester et al., 2021   input [P_e; X_e]: P trained embeddings before the token embeddings
  p_tuning_v2    Liu et al., 2022      every layer also attends to P trained keys/values (deep prompts)
  LoRAMoE   Dou et al., 2024           y = W0 x + s Σ_i g_i(x) B_i A_i x̃, g = softmax(W_g x): N whole LoRA experts
                                       routed per token (FFN only); optional balance loss (aux_loss)
  MoELoRA   Liu et al., 2024           y = W0 x + s Σ_i ω_{t,i} B_i A_i x̃, rank r split among N experts, ω_t =
                                       softmax(W_T e_t) from the example's task t (one gate for the model)
  MTL-LoRA  Yang et al., 2025          y = W0 x + s Σ_i softmax(w_t / τ)_i B_i Λ_t A x̃: shared A, per-task Λ_t (r, r)
  CoLA      Zhou et al., 2025          y = W_res x + s Σ_i Σ_j B_j A_i x̃, M A's and N B's fully collaborative;
                                       SVD init: W_res = W0 - (principal part), so the base is modified
  MultiLoRA Wang et al., 2023          y = W0 x + s Σ_i λ_i ⊙ B_i A_i x̃, n parallel LoRAs, λ_i (d_out,) from zero
  BSLoRA    Zhou et al., 2025          y = W0 x + s (B A + B_intra A_intra + B_inter A_inter) x̃: a local LoRA, one
                                       shared by the modules of a layer, one shared by every layer (slice | kron)
Task-gated adapters (MoELoRA, MTL-LoRA) read each example's task id, set before every forward with
set_task(model, task_ids); they merge one task at a time (merge(model, task=t)).
  VeRA      Kopiczko et al., 2024      y = W0 x + Λ_b B Λ_d A x̃, A and B frozen random (one pair, rebuilt from the
                                       seed), trained: the vectors d (r,) and b (d_out,) of each module
  VB-LoRA   Li et al., 2024            y = W0 x + B A x̃, every length-b piece of A and B a top-k softmax mixture of
                                       the vectors of ONE bank (h, b) shared by all modules and layers
Each adapter wraps a frozen nn.Linear in place and takes over its `weight`/`bias` Parameters, so the base
state-dict keys (`model.layers.0.self_attn.q_proj.weight`) do not change. A tensor shared by several
layers (MASA's bank, RaSA's pool; BSLoRA's, which every module type shares too, under `adapter_banks.all`)
lives once in `model.adapter_banks` (`adapter_banks.q_proj.A.0`) and layers reach it through a `Shared`
handle, so it is counted, saved, optimised and all-reduced once and its gradient is the sum over the
layers that use it. The two prompt methods wrap no Linear: inject attaches
them as `model.soft_prompt` (`soft_prompt.E`, `soft_prompt.prefix`), which Transformer.forward consults.

    params = inject(model, AdapterConfig(adapter="masa"))   # freezes the base, returns the trainables
    save_adapter(model, "out"); acfg = load_adapter(fresh_model, "out")
    merge(model); unmerge(model); export_peft(model, "peft_dir"); export_merged(model, "hf_dir")
    inject(model, AdapterConfig(adapter="mtllora", num_tasks=4), tasks=names)   # task-gated: names saved too
    set_task(model, task_ids)   # (B,) long, one per example, before each forward; merge(model, task=2)

Parameter report on the meta device (no weights needed):
    python adapters.py --model llama3-8b --adapter masa --r 8 --num_a 5 --share_group 2 --agg router [--json]
    python adapters.py --model llama3-8b --adapter rasa --r 8 --rasa_k 1
    python adapters.py --model llama3-8b --adapter mosa          # r = 32 budget, q,k,v,up,down (SPEC defaults)
    python adapters.py --model llama3-8b --adapter p_tuning_v2 --num_virtual_tokens 20 [--prefix_projection]
    python adapters.py --model llama3-8b --adapter moelora --num_tasks 16
    python adapters.py --model llama3-8b --adapter cola --num_a 2 --num_b 3 [--cola_init lora]
    python adapters.py --model llama3-8b --adapter multilora --num_a 3
    python adapters.py --model llama3-8b --adapter bslora --bs_r_local 2 --bs_r_intra 4 --bs_r_inter 8 [--bs_share kron]
    python adapters.py --model llama3-8b --adapter vera          # r = 1024, d_init = 0.1
    python adapters.py --model llama3-8b --adapter vblora        # r = 4, h = 2048 vectors of b = 256, top-k = 2
"""
import argparse
import hashlib
import inspect
import json
import math
import re
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kernels
from model import (ArgParser, LoadError, ModelConfig, Transformer, one_line_errors, read_json,
                   safetensors_header, write_atomic)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOSA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # SPEC.md: MoSA's default targets
PROMPTS = ("prompt_tuning", "p_tuning_v2")  # soft-prompt methods: no target projections (model.soft_prompt)
VOCAB_POPULATION = 5000  # prompt_init=vocab draws from the first 5000 rows (Lester et al. §3.2; their code's population_size)
# Defaults that differ by method, from the authors: LoRAMoE (paper's setup: FFN only, N = 6 experts of rank 4;
# alpha 32 as Ablustrund/LoRAMoE run_loramoe.sh, whose debug run uses N = 8), MOELoRA (liuqidong07/MOELoRA-peft:
# experiments/moelora.bash r = 16, N = 8; arguments.py alpha 32, d_T 64), MTL-LoRA (pUmpKin-Co/MTL-LoRA:
# script/llama2_7B_mlora_qkvo.sh q,k,v,o, n = 3 B's, τ = 0.1; r and alpha are that script's arguments: ours).
# Their dropouts (0.05, 0.1, 0.05) are not defaults here: nanoMASA's default dropout is 0 for every method.
METHOD_DEFAULTS = {  # field -> {adapter: default}; any other adapter takes the `None` entry
    "r": {"mosa": 32, "loramoe": 4, "moelora": 16, "vera": 1024, "vblora": 4, None: 8},  # VeRA: its Table 9; VB-LoRA: its §4.3
    "alpha": {"loramoe": 32.0, "moelora": 32.0, None: 16.0},
    "targets": {"mosa": ",".join(MOSA_TARGETS), "loramoe": "gate_proj,up_proj,down_proj",
                "mtllora": "q_proj,k_proj,v_proj,o_proj", "prompt_tuning": "", "p_tuning_v2": "", None: ",".join(TARGETS)},
    "num_a": {"masa": 5, "loramoe": 6, "moelora": 8, "cola": 2, "multilora": 3, None: 1},  # CoLA: M = 2, N = 3 (its paper)
    "num_b": {"mtllora": 3, "cola": 3, "loramoe": None, "moelora": None, "multilora": None, None: 1},  # None: = num_a, below
    "loramoe_beta": {"loramoe": 0.0},  # method-specific fields stay None for the other adapters
    "moelora_dim": {"moelora": 64},
    "mtllora_tau": {"mtllora": 0.1},
}
TASK_GATED = ("moelora", "mtllora")  # adapters whose update depends on each example's task id

# -----------------------------------------------------------------------------
# config


@dataclass
class AdapterConfig:
    adapter: str = "lora"              # lora | dora | hydralora | masa | rasa | mosa | loramoe | moelora | mtllora | cola | multilora | bslora | vera | vblora | prompt_tuning | p_tuning_v2
    r: Optional[int] = None            # rank r: A (r, d_in), B (d_out, r); unset: 8, mosa 32 (SPEC: LoRA r=32's budget), loramoe 4, moelora 16 (split among its N experts), vera 1024, vblora 4
    alpha: Optional[float] = None      # scaling s = alpha / r (alpha / sqrt(r) with --rslora); RaSA: D's start; MoSA, VeRA, VB-LoRA: unused; unset: 16, loramoe and moelora 32
    dropout: float = 0.0               # dropout probability on the adapter's input only, in [0, 1)
    targets: Optional[str] = None      # comma-separated projection names to adapt; unset: all seven, mosa q,k,v,up,down, loramoe gate,up,down (FFN), mtllora q,k,v,o, prompts none
    rslora: bool = False               # rsLoRA scaling s = alpha / sqrt(r)
    num_a: Optional[int] = None        # MASA: N experts A_i per bank; LoRAMoE / MoELoRA: N experts; CoLA: M A's; MultiLoRA: n LoRAs; MTL-LoRA: 1 (one shared A); unset: masa 5, loramoe 6, moelora 8, cola 2, multilora 3, else 1
    num_b: Optional[int] = None        # n_B heads B_j per layer, routed per token when > 1 (HydraLoRA; MASA's multi-B ablation); CoLA: N B's; MTL-LoRA: n up-projections; LoRAMoE / MoELoRA / MultiLoRA: = num_a; unset: 1, cola 3, mtllora 3
    share_group: int = 2               # MASA: S consecutive layers share a bank (S = 1: no sharing, the paper's MAE)
    share: str = "a"                   # MASA: what a group shares: a (MASA) | b | ab | none
    agg: str = "sum"                   # MASA: sum (the paper's Eq. 4-5) | router (per-layer softmax over experts)
    rasa_k: Optional[int] = None       # RaSA: k ranks per layer in the shared pool (kL in all), 1 <= k <= r; unset: r // 8, at least 1
    mosa_k: Optional[int] = None       # MoSA: K groups (scalars λ) per weight, 1 <= K <= d_out·d_in; unset: r·(d_out + d_in)
    num_virtual_tokens: int = 20       # P virtual tokens of prompt_tuning / p_tuning_v2 (peft's name; Lester et al. §3.2: little gain past 20)
    prompt_init: str = "vocab"         # prompt_tuning's P_e start: vocab (P rows of the first 5000 of embed_tokens, the paper's) | random (U(-0.5, 0.5))
    prefix_projection: bool = False    # p_tuning_v2: reparameterise the prefix by an MLP, E -> tanh -> 2·L·kv (the paper's code: off)
    prefix_hidden: int = 512           # p_tuning_v2: hidden width of that MLP (the paper's code's prefix_hidden_size)
    num_tasks: Optional[int] = None    # task-gated adapters (moelora, mtllora): T tasks, ids 0..T-1; train.py takes it from the data's meta.json
    loramoe_beta: Optional[float] = None  # LoRAMoE: β, weight of the balance loss β·Σ_modules L_lbc that train.py adds; unset: 0 (off)
    moelora_dim: Optional[int] = None  # MoELoRA: d_T, size of the task embedding e_t; unset: 64
    mtllora_tau: Optional[float] = None  # MTL-LoRA: τ, temperature of the task's mixing weights softmax(w_t / τ) over the B's; unset: 0.1
    cola_init: str = "svd"             # CoLA: svd (the paper's: principal singular components of W0, base <- residual) | lora
    bs_r_local: int = 2                # BSLoRA: rank of the local LoRA of each module (0: none; r only sets s = alpha / r)
    bs_r_intra: int = 4                # BSLoRA: rank of the intra-layer LoRA shared by a layer's modules (0: none)
    bs_r_inter: int = 8                # BSLoRA: rank of the inter-layer LoRA shared by every layer (0: none)
    bs_share: str = "slice"            # BSLoRA: shape transformation of the shared LoRAs: slice | kron (gate: not implemented)
    bs_kron_size: int = 256            # BSLoRA kron: side K of the shared A (r, K), B (K, r); K must divide every d_in, d_out
    vera_d_init: float = 0.1           # VeRA: d_init, the start of every entry of d (b starts at 0); the paper's Tables 6c, 8
    vb_num_vectors: int = 2048         # VB-LoRA: h vectors in the one bank shared by every module and layer (its Llama-2 §4.3)
    vb_vector_len: int = 256           # VB-LoRA: b, length of a bank vector (= of a sub-vector); must divide every adapted d_in, d_out
    vb_topk: int = 2                   # VB-LoRA: k bank vectors mixed per sub-vector (softmax over the k largest logits)
    seed: int = 0                      # seed of the adapter initialisation, of MoSA's partition, of VeRA's A, B (same on every DDP rank)

    def __post_init__(self):
        # unset fields take the method's default here, so asdict() and adapter.json always hold explicit values
        for name, by_method in METHOD_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, by_method.get(self.adapter, by_method.get(None)))
        if self.num_b is None:  # loramoe / moelora: one B per expert
            self.num_b = self.num_a
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
        for name, sym in (("r", "r"), ("num_a", "N"), ("share_group", "S"), ("num_b", "n_B"),
                          ("num_virtual_tokens", "P"), ("prefix_hidden", "h"), ("vb_num_vectors", "h"),
                          ("vb_vector_len", "b"), ("vb_topk", "k")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({sym}) must be >= 1, got {getattr(self, name)}: pass --{name} 1 or more")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}: pass --alpha 16 (or another positive value)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}: pass --dropout 0.05 for example")
        if self.adapter in PROMPTS and self.target_list:
            raise ValueError(f"targets do not apply to {self.adapter}: it adapts no projection (its P virtual tokens come "
                             f"before the input); drop --targets")
        if self.adapter not in PROMPTS and not self.target_list:
            raise ValueError("targets is empty: pass --targets q_proj,v_proj (or omit it for all seven)")
        for t in self.target_list:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}: targets must be among {','.join(TARGETS)}")
        if self.share not in ("a", "b", "ab", "none"):
            raise ValueError(f"unknown share {self.share!r}: choose a, b, ab or none")
        if self.agg not in ("sum", "router"):
            raise ValueError(f"unknown agg {self.agg!r}: choose sum or router")
        if self.prompt_init not in ("vocab", "random"):
            raise ValueError(f"unknown prompt_init {self.prompt_init!r}: choose vocab or random")
        if self.adapter == "rasa" and not 1 <= self.rasa_k <= self.r:
            raise ValueError(f"rasa_k (k) must be in [1, r={self.r}], got {self.rasa_k}: pass --rasa_k between 1 and "
                             f"{self.r} (unset: r // 8, at least 1)")
        if self.adapter == "cola" and self.cola_init not in ("svd", "lora"):
            raise ValueError(f"unknown cola_init {self.cola_init!r}: choose svd (the paper's) or lora (Kaiming A, zero B)")
        if self.adapter == "multilora" and self.num_b != self.num_a:
            raise ValueError(f"num_b must equal num_a for multilora (n LoRAs, one B per A), got num_a={self.num_a}, "
                             f"num_b={self.num_b}: pass only --num_a")
        if self.adapter == "bslora":
            ranks = (self.bs_r_local, self.bs_r_intra, self.bs_r_inter)
            if min(ranks) < 0 or sum(ranks) < 1:
                raise ValueError(f"bs_r_local, bs_r_intra, bs_r_inter must be >= 0 with a positive sum, got {ranks}: "
                                 f"pass e.g. --bs_r_local 2 --bs_r_intra 4 --bs_r_inter 8")
            if self.bs_share not in ("slice", "kron"):
                raise ValueError(f"unknown bs_share {self.bs_share!r}: choose slice or kron")
            if self.bs_kron_size < 1:
                raise ValueError(f"bs_kron_size (K) must be >= 1, got {self.bs_kron_size}: pass --bs_kron_size 256 "
                                 f"(it must divide every adapted d_in and d_out)")
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
        self._validate_moe()
        return self

    def _validate_moe(self):
        """LoRAMoE, MoELoRA, MTL-LoRA: their own fields, and no field of theirs set for another adapter."""
        for name, by_method in METHOD_DEFAULTS.items():
            owner = next(iter(by_method))
            if None not in by_method and getattr(self, name) is not None and self.adapter != owner:
                raise ValueError(f"{name} applies to --adapter {owner} only, got {name}={getattr(self, name)} with "
                                 f"--adapter {self.adapter}: drop --{name}")
        if self.adapter in ("loramoe", "moelora") and self.num_b != self.num_a:
            raise ValueError(f"{self.adapter} pairs each expert's A_i with its own B_i, so num_b must equal num_a (N), "
                             f"got num_b={self.num_b}, num_a={self.num_a}: drop --num_b")
        if self.adapter == "moelora" and self.r % self.num_a:
            raise ValueError(f"moelora splits rank r={self.r} among N={self.num_a} experts of rank r/N: r must be a "
                             f"multiple of num_a; pass e.g. --r {self.num_a * max(1, self.r // self.num_a)}")
        if self.adapter == "mtllora" and self.num_a != 1:
            raise ValueError(f"mtllora has one shared A (num_a = 1), got num_a={self.num_a}: drop --num_a "
                             f"(its n up-projections are --num_b)")
        if self.adapter in TASK_GATED:
            if self.num_tasks is None:
                raise ValueError(f"{self.adapter} is task-gated and needs num_tasks (T): pass --num_tasks T (train.py "
                                 f"takes it from the data's meta.json tasks)")
            if self.num_tasks < 1:
                raise ValueError(f"num_tasks (T) must be >= 1, got {self.num_tasks}: pass --num_tasks 1 or more")
        elif self.num_tasks is not None:
            raise ValueError(f"num_tasks applies to task-gated adapters ({', '.join(TASK_GATED)}) only, got "
                             f"num_tasks={self.num_tasks} with --adapter {self.adapter}: drop --num_tasks")
        if self.loramoe_beta is not None and not (self.loramoe_beta >= 0 and math.isfinite(self.loramoe_beta)):
            raise ValueError(f"loramoe_beta (β) must be a finite number >= 0, got {self.loramoe_beta}: pass "
                             f"--loramoe_beta 0.1 for example (0 = no balance loss)")
        if self.moelora_dim is not None and self.moelora_dim < 1:
            raise ValueError(f"moelora_dim (d_T) must be >= 1, got {self.moelora_dim}: pass --moelora_dim 64 for example")
        if self.mtllora_tau is not None and not (self.mtllora_tau > 0 and math.isfinite(self.mtllora_tau)):
            raise ValueError(f"mtllora_tau (τ) must be a finite number > 0, got {self.mtllora_tau}: pass "
                             f"--mtllora_tau 0.1 for example")


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


def check_field_types(cls, d, where):
    """Every value of dict d (a saved dataclass `cls`) has its field's type: one line naming the first that does
    not, instead of a TypeError deep inside (an adapter.json edited by hand, "r": "8")."""
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        tp = hints[k]
        ok = (v is None and type(None) in typing.get_args(tp)) or {
            int: isinstance(v, int) and not isinstance(v, bool), bool: isinstance(v, bool), str: isinstance(v, str),
            float: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(
            next((a for a in typing.get_args(tp) if a is not type(None)), tp), True)
        if not ok:
            raise LoadError(f"{where}: {k} is {v!r}, of the wrong type: restore the file or save the adapter again")


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
    d_max = (largest d_in, largest d_out) over the adapted modules (BSLoRA's slice sharing sizes its shared LoRAs
    so; VeRA draws its one frozen A, B pair at that size)."""

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
    task_gated = False    # True: the update depends on each example's task id (TaskGated)

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
    def init(self, site, shape, kind, fan_in=None, std=None, bound=None):
        """kind: "zeros"; "eye" (an identity matrix in each trailing (r, r) block); "normal" (N(0, std²));
        "uniform" (U(-bound, bound)); "kaiming" (kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = shape[-1] unless given)."""
        dev = self.weight.device
        if kind == "zeros":
            return torch.zeros(shape, device=dev)
        if kind == "eye":
            return torch.eye(shape[-1], device=dev).expand(shape).clone()
        if dev.type == "meta":
            return torch.empty(shape, device=dev)
        if kind == "normal":
            return torch.empty(shape).normal_(0.0, std, generator=site.gen).to(dev)
        # kaiming_uniform_(a=sqrt(5)) of each (fan_out, fan_in) matrix, fan_in = shape[-1] unless given: d_in for every A
        # and router (SPEC), r for MultiLoRA's B (d_out, r), BSLoRA's shared sizes for its shared A's
        bound = bound if kind == "uniform" else 1 / math.sqrt(fan_in or shape[-1])
        return torch.empty(shape).uniform_(-bound, bound, generator=site.gen).to(dev)

    def tensor(self, site, name, shape, kind, group=None, mtype=None, **init):
        """Register a private Parameter `name`; or, given a group index, take the group's shared tensor
        from site.banks (created on first use) and keep only a Shared handle to it. mtype: the bank's key
        (default: this module's type; "task" for MoELoRA's gate, one for the whole model)."""
        make = lambda: self.init(site, shape, kind, **init)
        if group is None:
            setattr(self, name, nn.Parameter(make()))
        else:
            setattr(self, name, site.banks.shared(mtype or site.mtype, name, group, make))

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


# -----------------------------------------------------------------------------
# soft prompts: P virtual positions before the input, consulted by Transformer.forward (model.soft_prompt)


def draw(shape, kind, gen, device, fan_in=None):
    """fp32 init tensor on `device`, drawn from the CPU generator gen (the same on every device and rank):
    "normal" N(0, 1) (nn.Embedding's default), "uniform" U(-0.5, 0.5), "linear" U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (nn.Linear's default for weight and bias). Shapes only on the meta device (parameter reports)."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    if kind == "normal":
        return torch.randn(shape, generator=gen).to(device)
    bound = 0.5 if kind == "uniform" else 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen).to(device)


class SoftPrompt(nn.Module):
    """Common base of the prompt methods: P virtual positions that come before the real tokens. They wrap no
    Linear; Transformer.add_soft_prompt asks for embeds() (deep = False) or kv() (deep = True). Not mergeable:
    nothing in the base weights can stand for tokens that are attended to."""
    deep = False
    not_mergeable = None  # set by subclasses: one line

    def __init__(self, model, acfg):
        super().__init__()
        cfg = model.config
        self.P, self.L, self.C = acfg.num_virtual_tokens, cfg.n_layers, cfg.hidden_size
        self.n_kv, self.D = cfg.n_kv_heads, cfg.head_dim
        self.drop = nn.Dropout(acfg.dropout) if acfg.dropout > 0 else nn.Identity()  # on the prompt itself

    def unmerge(self):
        pass  # never merged (merge refuses)


class PromptTuning(SoftPrompt):
    not_mergeable = ("prompt_tuning is not mergeable: its P trained embeddings are extra input tokens that every "
                     "later token attends to, not a change of any weight; keep it as an adapter (save_adapter)")

    def __init__(self, model, acfg, gen):
        super().__init__(model, acfg)
        W = model.model.embed_tokens.weight.detach()  # (V, C) frozen token embeddings
        if acfg.prompt_init == "vocab":
            # Lester et al. 2021 §2.1/§3.2 and their code (prompts.from_sample_of_embeddings): P rows drawn without
            # replacement (with, if P exceeds it) from the first 5000 of the vocabulary, T5's most frequent tokens;
            # Llama 3 / Qwen2 ids follow BPE merge order, so low ids are frequent pieces too. The paper's best,
            # "class label" init, needs task labels and does not apply to instruction tuning. Their default
            # configuration has P = 100; we default to P = 20 (their §3.2 ablation: past 20 the gains are marginal,
            # and none at XXL scale; peft's examples use 20).
            pop = min(VOCAB_POPULATION, W.shape[0])
            ids = torch.randperm(pop, generator=gen)[:self.P] if self.P <= pop else torch.randint(pop, (self.P,), generator=gen)
            E = W[ids.to(W.device)].float().clone()
        else:  # their code's default initializer: uniform, scale 0.5
            E = draw((self.P, self.C), "uniform", gen, W.device)
        self.E = nn.Parameter(E)  # (P, C) the paper's P_e, fp32

    # Lester et al. 2021 §2: the frozen model reads [P_e; X_e] ∈ R^{(P+T)×C}, the P prompt embeddings before the
    # embedded input; only P_e trains. The virtual positions are ordinary inputs at positions 0..P-1 (as in peft).
    def embeds(self, dtype):
        return self.drop(self.E).to(dtype)  # (P, C)


class PTuningV2(SoftPrompt):
    deep = True
    not_mergeable = ("p_tuning_v2 is not mergeable: its trained keys/values are extra attention entries at every "
                     "layer, not a change of any weight; keep it as an adapter (save_adapter)")

    def __init__(self, model, acfg, gen):
        super().__init__(model, acfg)
        dev, kv = model.model.embed_tokens.weight.device, self.n_kv * self.D
        self.projection, h = acfg.prefix_projection, acfg.prefix_hidden
        # The paper's code (THUDM/P-tuning-v2 PrefixEncoder, and peft's): nn.Embedding (N(0, 1)) holding the prefix
        # itself, or, with prefix_projection, an embedding E (P, C) fed through Linear(C, h), tanh, Linear(h, 2·L·kv)
        # (nn.Linear's default init).
        if self.projection:
            self.E = nn.Parameter(draw((self.P, self.C), "normal", gen, dev))             # (P, C)
            self.W1 = nn.Parameter(draw((h, self.C), "linear", gen, dev, self.C))         # (h, C)
            self.b1 = nn.Parameter(draw((h,), "linear", gen, dev, self.C))
            self.W2 = nn.Parameter(draw((2 * self.L * kv, h), "linear", gen, dev, h))     # (2·L·kv, h)
            self.b2 = nn.Parameter(draw((2 * self.L * kv,), "linear", gen, dev, h))
        else:
            self.prefix = nn.Parameter(draw((self.L, 2, self.P, kv), "normal", gen, dev))  # (L, K|V, P, kv), fp32

    # Liu et al. 2022 (P-tuning v2) §3.2, deep prompt tuning: at every layer l the attention reads keys [K_l^p; K]
    # and values [V_l^p; V], with P trained rows each (no RoPE: they are stored keys, as in peft's prefix cache);
    # the real tokens sit at positions P.. (peft offsets their position ids by P). Reparameterised (optional,
    # "depends on tasks and datasets", §3.3): [K^p; V^p] = W2 tanh(W1 E + b1) + b2. The code's dropout on the
    # prefix is our `dropout` (0 unless asked). Its NLU classification head does not apply: we keep the LM head, as
    # peft does. SPEC.md lists "P-tuning"; issue #8 asks for v2. P-tuning v1 (Liu et al. 2021, "GPT Understands,
    # Too": input-layer prompts made by an LSTM/MLP encoder) is not implemented.
    def kv(self, dtype):
        if self.projection:
            flat = F.linear(torch.tanh(F.linear(self.E, self.W1, self.b1)), self.W2, self.b2)   # (P, 2·L·kv)
            prefix = flat.view(self.P, self.L, 2, -1).permute(1, 2, 0, 3)                      # (L, 2, P, kv)
        else:
            prefix = self.prefix
        prefix = self.drop(prefix).to(dtype)
        return prefix.unflatten(-1, (self.n_kv, self.D)).transpose(2, 3)                     # (L, 2, Hkv, P, D)


# -----------------------------------------------------------------------------
# the MASA paper's other baselines: LoRAMoE, MoELoRA, MTL-LoRA, CoLA, MultiLoRA, BSLoRA, VeRA, VB-LoRA


class LoRAMoE(Adapter):
    """N complete LoRA experts (A_i (r, d_in) stacked (N, r, d_in); B_i side by side in B (d_out, N r)) and a
    per-layer token router W_g (N, d_in), no bias. Trainable params per module: N·r·(d_in + d_out) + N·d_in.
    Init as the authors' code (Ablustrund/LoRAMoE, peft/tuners/lora.py): every A_i and W_g Kaiming-uniform,
    every B_i zero. The paper adapts the FFN only (gate, up, down: the default targets)."""
    not_mergeable = ("LoRAMoE mixes its experts per token (g = softmax(W_g x)), so it has no single merged "
                     "weight: keep it unmerged (export_merged does not apply)")

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.N, self.beta = acfg.num_a, acfg.loramoe_beta
        self.tensor(site, "A", (self.N, self.r, self.d_in), "kaiming")    # A_i = A[i] (r, d_in)
        self.tensor(site, "B", (self.d_out, self.N * self.r), "zeros")    # B_i = B[:, i r:(i+1) r], zero
        self.tensor(site, "W_g", (self.N, self.d_in), "kaiming")          # router W_g (N, d_in)
        self.balance = None  # L_lbc of the last training forward (when beta > 0), collected by aux_loss()

    # Dou et al. 2024 (LoRAMoE), the LoRAMoE layer: y = W0 x + s Σ_i g_i(x) B_i A_i x̃, g = softmax(W_g x), s = alpha / r
    # (the router sees the clean x, as in the authors' code). Σ_i g_i B_i h_i = B (g ⊙ h) with h = [A_1; ..; A_N] x̃
    # (n, N r) and g repeated r times per expert: two matmuls in all, never N.
    def forward(self, x):
        x2 = x.reshape(-1, self.d_in)                                           # (n, d_in), n = tokens
        y = F.linear(x2, self.weight, self.bias)                               # (n, d_out)
        h, (g,) = self.project(x2, self.A.flatten(0, 1), [self.W_g])           # (n, N r), (n, N)
        if self.training and self.beta > 0:
            self.balance = self.balance_loss(g.view(x.shape[0], -1, self.N))  # examples = x's first dim
        z = (g.unsqueeze(-1).to(h.dtype) * h.unflatten(-1, (self.N, self.r))).flatten(-2)  # (n, N r)
        return self.add_lowrank_(y, z, self.B).view(*x.shape[:-1], self.d_out)

    @staticmethod
    def balance_loss(g):
        """g (E, T, N) router weights of E examples of T tokens -> LoRAMoE's balance loss in its general form.
        Importance Q[m, n] = Σ_t g[m, t, n] (expert n's total weight in example m); the paper's "localized
        balancing constraint" weighs it, Z = I ∘ Q, with I[m, n] = 1 + δ when expert n's type matches example
        m's type (world knowledge / downstream task) and 1 - δ otherwise. nanoMASA's data has no such type
        split, so I = 1 (δ = 0), Z = Q, and
            L_lbc = σ²(Q) / μ(Q)²     (the squared coefficient of variation over all E·N entries)
        as the authors' code computes it (cv_squared: torch's unbiased var / (mean² + 1e-10), summed over
        modules, times β). The paper's text, as we recall it (we could not retrieve it to check), divides by
        μ(Z) rather than μ(Z)²: we follow the code, which is scale-free, where σ²/μ grows with the sequence
        length. Padding positions are counted, as in their code. A single entry (one example, one expert): 0."""
        Q = g.float().sum(1)                                                    # (E, N)
        if Q.numel() == 1:
            return Q.sum() * 0
        return Q.var() / (Q.mean() ** 2 + 1e-10)


class TaskGated(Adapter):
    """Base of the adapters whose update depends on each example's task id t (MoELoRA, MTL-LoRA). The ids are
    set before each forward by set_task(model, task_ids (B,)) and kept on every such module as `task_ids`
    (a plain attribute: not a buffer, not saved); task_ids[b] applies to every token of example b = x[b]
    (one id applies to the whole batch). Subclasses define adapt(x, y, t) with t (n,) the task of each
    token, and delta_weight(task). Merging is per task: merge(task) folds task t's update into W0; a merged
    module refuses a forward whose task ids name another task."""
    task_gated = True

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.T = acfg.num_tasks
        self.task_ids = None     # (B,) or (1,) long, on W0's device; set_task() writes it
        self.merged_task = None  # the task folded into W0 while merged

    def token_tasks(self, x):
        """x (B, ..., d_in) -> (n,) task id of each of its n = x.numel() / d_in tokens (None: merged, no ids)."""
        t = self.task_ids
        if self.merged and (t is None or bool((t == self.merged_task).all())):
            return None
        name = type(self).__name__
        if self.merged:
            raise ValueError(f"{name} is merged for task {self.merged_task} but the batch has task ids "
                             f"{sorted(set(t.tolist()))}: unmerge(model) first, or merge(model, task=t) per task")
        if t is None:
            raise ValueError(f"{name} is task-gated but no task ids are set: call adapters.set_task(model, task_ids) "
                             f"with one id per example before the forward")
        if len(t) not in (1, x.shape[0]):
            raise ValueError(f"{name}: {len(t)} task ids for a batch of {x.shape[0]} examples: pass "
                             f"adapters.set_task(model, task_ids) one id per example (or one for all)")
        return t.view(-1, 1).expand(x.shape[0], math.prod(x.shape[1:-1])).reshape(-1)   # (n,)

    def forward(self, x):
        t = self.token_tasks(x)
        x2 = x.reshape(-1, self.d_in)                                    # (n, d_in), n = tokens
        y = F.linear(x2, self.weight, self.bias)                        # (n, d_out): W0 (+ ΔW_t when merged)
        if not self.merged:
            y = self.adapt(x2, y, t)
        return y.view(*x.shape[:-1], self.d_out)

    def merged_weight(self, task=None):
        if task is None:
            raise ValueError(f"{type(self).__name__} is task-gated: its merged weight is per task; pass task=t")
        with torch.no_grad():
            return (self.weight.float() + self.delta_weight(task)).to(self.weight.dtype)

    def merge(self, task=None):
        if not self.merged:
            W = self.merged_weight(task)
            self.W0_unmerged, self.weight.data, self.merged, self.merged_task = self.weight.data, W, True, task

    def unmerge(self):
        super().unmerge()
        self.merged_task = None


class MoELoRA(TaskGated):
    """Rank r split among N experts of rank r/N: A_i stacked (N, r/N, d_in), B_i = B[:, i r/N:(i+1) r/N] of
    B (d_out, r). The task-motivated gate is ONE for the whole model, as in the paper ("a task-motivated gate
    function for all MOELoRA layers") and the authors' experiments (MOELoRA-peft: lora_name moelora ->
    MMOELoraConfigS / PeftModelForCausalLMShared): a task embedding table E (T, d_T) and W_T (N, d_T) without
    bias, kept once in model.adapter_banks.task.{E,W_T}.0. Trainable params: L·r·(d_in + d_out) per module
    type (LoRA's at rank r), plus T·d_T + N·d_T once. Init as the authors' code: A_i ~ N(0, 0.01²), B_i = 0,
    E ~ N(0, 1) (nn.Embedding), W_T Kaiming-uniform (nn.Linear, fan_in d_T). Their table has T + 1 rows (row
    0 unused by one-hot ids); ours has T."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.N, self.d_T = acfg.num_a, acfg.moelora_dim
        self.tensor(site, "A", (self.N, self.r // self.N, self.d_in), "normal", std=0.01)  # A_i (r/N, d_in)
        self.tensor(site, "B", (self.d_out, self.r), "zeros")                              # B_i side by side
        self.tensor(site, "E", (self.T, self.d_T), "normal", group=0, mtype="task", std=1.0)  # e_t = E[t]
        self.tensor(site, "W_T", (self.N, self.d_T), "kaiming", group=0, mtype="task", fan_in=self.d_T)

    def gates(self):
        """ω (T, N): ω_t = softmax(W_T e_t), every task's weights over the experts."""
        return torch.softmax(val(self.E) @ val(self.W_T).t(), dim=-1)

    # Liu et al. 2024 (MOELoRA), the MOELoRA layer and its task-motivated gate:
    #     y = W0 x + s Σ_i ω_{t,i} B_i A_i x̃,  ω_t = softmax(W_T e_t),  s = alpha / r
    # (r the total rank, as the authors' code). Σ_i ω_i B_i A_i x = B (ω̄ ⊙ A x) with ω̄ = ω repeated r/N times per
    # expert: one rank-r matmul pair per token, like LoRA, whatever N.
    def adapt(self, x, y, t):
        h, _ = self.project(x, self.A.flatten(0, 1))                            # (n, r)
        g = self.gates()[t].repeat_interleave(self.r // self.N, dim=-1)         # (n, r) ω̄ of each token's task
        return self.add_lowrank_(y, h * g.to(h.dtype), self.B)

    def delta_weight(self, task):  # ΔW_t = s Σ_i ω_{t,i} B_i A_i, fp32 (d_out, d_in)
        g = self.gates()[task].repeat_interleave(self.r // self.N)              # (r,)
        return self.s * (self.B * g) @ self.A.flatten(0, 1)


class MTLLoRA(TaskGated):
    """One shared A (r, d_in), per task Λ_t (r, r) stacked (T, r, r), n up-projections B_i side by side in B
    (d_out, n r), per task mixing logits w (T, n). Trainable params per module: r·d_in + T·r² + n·r·d_out + T·n.
    Init as the authors' code (pUmpKin-Co/MTL-LoRA src/adapter/mlora.py, diagonal_format=False): A Kaiming-
    uniform, every Λ_t = I, B = 0, w Kaiming-uniform (fan_in n)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.n_B, self.tau = acfg.num_b, acfg.mtllora_tau
        self.tensor(site, "A", (self.r, self.d_in), "kaiming")                       # A (r, d_in), shared by tasks
        self.tensor(site, "Lam", (self.T, self.r, self.r), "eye")                    # Λ_t (r, r), identity
        self.tensor(site, "B", (self.d_out, self.n_B * self.r), "zeros")             # B_i = B[:, i r:(i+1) r]
        self.tensor(site, "w", (self.T, self.n_B), "kaiming", fan_in=self.n_B)       # w_t (n,)

    def mix(self):
        """c (T, n): c_t = softmax(w_t / τ), task t's weights over the n up-projections."""
        return torch.softmax(self.w / self.tau, dim=-1)

    # Yang et al. 2025 (MTL-LoRA), the forward of task t (as in the authors' mLoRALinear):
    #     y = W0 x + s Σ_i c_{t,i} B_i Λ_t A x̃,  c_t = softmax(w_t / τ),  s = alpha / r.
    # Σ_i c_i B_i z = B (c ⊗ z) with z = Λ_t A x̃: one matmul into B (d_out, n r), as HydraLoRA's heads.
    def adapt(self, x, y, t):
        h, _ = self.project(x, self.A)                                   # (n, r)
        z = torch.einsum("nij,nj->ni", self.Lam[t].to(h.dtype), h)       # (n, r) Λ_t A x̃ of each token's task
        c = self.mix()[t].to(h.dtype)                                    # (n, n_B)
        return self.add_lowrank_(y, (c.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2), self.B)  # (n, n_B r)

    def delta_weight(self, task):  # ΔW_t = s (Σ_i c_{t,i} B_i) Λ_t A, fp32 (d_out, d_in)
        B_t = (self.B.view(self.d_out, self.n_B, self.r) * self.mix()[task][:, None]).sum(1)   # (d_out, r)
        return self.s * B_t @ self.Lam[task] @ self.A


def weight_checksum(W):
    """sha256 (first 16 hex digits) of a tensor's dtype, shape and bytes, the same wherever W lives."""
    digest = hashlib.sha256(f"{W.dtype} {tuple(W.shape)}\n".encode())
    for chunk in W.detach().reshape(-1).split(1 << 22):  # bounded host memory for large weights
        digest.update(chunk.cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class CoLA(Adapter):
    """M down-projections A_i (r, d_in), stacked (M, r, d_in), and N up-projections B_j (d_out, r), stacked
    (N, d_out, r), per layer. Fully collaborative: every pair (A_i, B_j) is a LoRA, so
        ΔW = s Σ_i Σ_j B_j A_i = s (Σ_j B_j)(Σ_i A_i),
    one rank-r product: two matmuls per call, never M·N. Trainable per module: M·r·d_in + N·r·d_out.
    cola_init = "svd" (the paper's) moves the top-r singular part of W0 into the adapter and REPLACES the frozen
    weight by the residual W_res = W0 - s ΣΣ B_j A_i, rounded once to W0's dtype: the adapted model equals the
    base only up to that rounding, and the adapter means something on W_res only (save_adapter records the
    checksum of the plain W0 it was derived from; load_adapter refuses any other base, then rebuilds W_res from
    it by the same SVD: equal up to fp32 rounding, not bit for bit across thread counts or devices). cola_init = "lora":
    Kaiming A_i, zero B_j, the base untouched (identity at init).
    A fact to see: every A_i gets the same gradient s (Σ_j B_j)ᵀ G x̃ᵀ and every B_j the same s G ((Σ_i A_i) x̃)ᵀ
    (like MASA's Eq. 8), so tensors that start equal stay equal under AdamW: with svd all A_i and all B_j do;
    with lora init the B_j do (all zero at start)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.M, self.N, self.svd = acfg.num_a, acfg.num_b, acfg.cola_init == "svd"
        if self.svd and self.r > min(self.d_out, self.d_in):
            raise ValueError(f"cola: r={self.r} exceeds the rank of {site.mtype} ({self.d_out}x{self.d_in}), the SVD init "
                             f"has only {min(self.d_out, self.d_in)} singular components: lower --r or pass --cola_init lora")
        self.tensor(site, "A", (self.M, self.r, self.d_in), "zeros" if self.svd else "kaiming")  # A_i (r, d_in)
        self.tensor(site, "B", (self.N, self.d_out, self.r), "zeros")                           # B_j (d_out, r)
        if self.svd and self.weight.device.type != "meta":
            self.principal_init_()

    def principal_init_(self):
        """Zhou et al. 2025 (CoLA), its PiSSA-style init (Meng et al. 2024) spread over M A's and N B's, as the
        authors' code does it (peft/tuners/cola/layer.py, pissa_init): fp32 SVD W0 = U diag(S) Vᵀ on W0's device,
        A_i = diag(sqrt(S_r / s)) V_rᵀ / M, B_j = U_r diag(sqrt(S_r / s)) / N, so s ΣΣ B_j A_i = U_r diag(S_r) V_rᵀ,
        the top-r part of W0; then W0 <- W_res = W0 - U_r diag(S_r) V_rᵀ (one rounding to W0's dtype)."""
        self.base_checksum = weight_checksum(self.weight)            # of the plain W0: exact bytes, anywhere
        with torch.no_grad():
            W0 = self.weight.float()                                   # (d_out, d_in)
            U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
            root = (S[:self.r] / self.s).sqrt()                        # (r,)
            A, B = root[:, None] * Vh[:self.r], U[:, :self.r] * root   # (r, d_in), (d_out, r)
            self.A.copy_(A.expand(self.M, -1, -1) / self.M)
            self.B.copy_(B.expand(self.N, -1, -1) / self.N)
            self.weight.data = torch.addmm(W0, B, A, alpha=-self.s).to(self.weight.dtype)  # a new tensor: W0 is not
            # overwritten in place, so load_adapter can put it back if the load fails

    # Zhou et al. 2025 (CoLA, ACL Findings; its "fully collaborative" strategy, checked against the authors' code
    # as its equation numbers could not be read here): y = W x + s Σ_i Σ_j B_j A_i x̃ (W = W_res with svd).
    # The authors' code draws a dropout mask per pair (M·N masks); we use one mask on the adapter's input (SPEC).
    def adapt(self, x, y):
        h, _ = self.project(x, self.A.sum(0))           # (n, r) = (Σ_i A_i) x̃
        return self.add_lowrank_(y, h, self.B.sum(0))   # += s (Σ_j B_j) h

    def delta_weight(self):  # ΔW = s (Σ_j B_j)(Σ_i A_i), fp32 (d_out, d_in)
        return self.s * (self.B.sum(0) @ self.A.sum(0))


class MultiLoRA(Adapter):
    """N = num_a parallel LoRAs (the paper's n), each A_i (r, d_in), B_i (d_out, r) with a learnable scaling
    λ_i (d_out,) per output row; stacked A (N, r, d_in), B (N, d_out, r), λ (N, d_out). A and B both start
    Kaiming-uniform (fan_in d_in for A, r for B), λ at zero: identity at init, and at the first step only λ
    has a nonzero gradient (A's and B's pass through λ = 0). Trainable per module: N·(r·d_in + r·d_out + d_out)."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.N = acfg.num_a
        self.tensor(site, "A", (self.N, self.r, self.d_in), "kaiming")   # A_i (r, d_in)
        self.tensor(site, "B", (self.N, self.d_out, self.r), "kaiming")  # B_i (d_out, r), Kaiming too (not zero)
        self.tensor(site, "lam", (self.N, self.d_out), "zeros")          # λ_i (d_out,), zero: identity at init

    def scaled_B(self):  # [λ_1 ⊙ B_1 | ... | λ_N ⊙ B_N] (d_out, N r): as small as B, rebuilt per call
        return (self.lam[:, :, None] * self.B).permute(1, 0, 2).flatten(1)

    # Wang et al. 2023 (MultiLoRA, §3): ΔW = Σ_i λ_i ⊙ B_i A_i with zero-started scaling factors and Kaiming B_i,
    # times SPEC's s = alpha / r, as the reproduction we checked does (SAMoRA's MultiLoRALinear: per-row
    # lora_scaling (n, d_out), scaling_factor alpha / r; the paper's text could not be checked here for a
    # scalar-vs-row scaling). y = W0 x + s Σ_i λ_i ⊙ (B_i A_i x̃): one matmul against the stacked A, one against
    # the scaled B, never N pairs.
    def adapt(self, x, y):
        h, _ = self.project(x, self.A.flatten(0, 1))  # (n, N r) = [A_1 x̃; ...; A_N x̃]
        return self.add_lowrank_(y, h, self.scaled_B())

    def delta_weight(self):  # ΔW = s Σ_i diag(λ_i) B_i A_i, fp32 (d_out, d_in)
        return self.s * (self.scaled_B() @ self.A.flatten(0, 1))


class BSLoRA(Adapter):
    """Three LoRAs summed: a local pair A (r_l, d_in), B (d_out, r_l) per module; an intra-layer pair shared by
    the adapted modules of layer l (adapter_banks.all.{A,B}_intra.<l>, one per layer, every module type); an
    inter-layer pair shared by every adapted module (adapter_banks.all.{A,B}_inter.0). Module types differ in
    shape, so each module transforms the shared pairs (bs_share):
      slice (the lab's default): the shared A (r, D_in), B (D_out, r) have the largest shapes, D = the largest
            d_in / d_out among the adapted modules, and a module uses the centred slices A[:, c_in : c_in + d_in],
            B[c_out : c_out + d_out] with c = (D - d) // 2, as the authors' slice_forward does. Trainable: per
            type L·r_l·(d_in + d_out), shared (L·r_intra + r_inter)·(D_in + D_out).
      kron (the authors' code default, K = 256): the shared A (r, K), B (K, r) are extended per module by its
            own factors σ_A (1, d_in/K), σ_B (d_out/K, 1) (Kaiming, as nn.Linear(d_in/K, 1) and nn.Linear(1,
            d_out/K)): A_ext = σ_A ⊗ A (r, d_in), B_ext = σ_B ⊗ B (d_out, r). Trainable: per type L·r_l·(d_in +
            d_out) + L·(d_in + d_out)/K per shared pair used, shared (L·r_intra + r_inter)·2K.
    Shared A's start Kaiming with fan_in their full width (D_in or K), every B at zero: identity at init.
    s = alpha / r as SPEC's default; r sizes nothing else here (the ranks are bs_r_*): the authors' code fixes
    s = 2, which the defaults alpha = 16, r = 8 give. The gate transformation is not implemented."""

    def __init__(self, base, acfg, site):
        super().__init__(base, acfg, site)
        self.ranks = dict(local=acfg.bs_r_local, intra=acfg.bs_r_intra, inter=acfg.bs_r_inter)
        self.kron = acfg.bs_share == "kron"
        (D_in, D_out), K = site.d_max, acfg.bs_kron_size
        if self.kron and (self.d_in % K or self.d_out % K):
            raise ValueError(f"bslora kron: bs_kron_size K={K} does not divide {site.mtype}'s shape {self.d_out}x"
                             f"{self.d_in}: pass a --bs_kron_size dividing every adapted d_in and d_out, or --bs_share slice")
        self.cut_in = slice((D_in - self.d_in) // 2, (D_in - self.d_in) // 2 + self.d_in)      # centred in D_in
        self.cut_out = slice((D_out - self.d_out) // 2, (D_out - self.d_out) // 2 + self.d_out)
        if self.ranks["local"]:
            self.tensor(site, "A", (self.ranks["local"], self.d_in), "kaiming")   # A (r_l, d_in)
            self.tensor(site, "B", (self.d_out, self.ranks["local"]), "zeros")    # B (d_out, r_l)
        for part, group in (("intra", site.l), ("inter", 0)):
            r = self.ranks[part]
            if not r:
                continue
            w_in, w_out = (K, K) if self.kron else (D_in, D_out)
            self.tensor(site, f"A_{part}", (r, w_in), "kaiming", group, mtype="all")   # shared A (r, D_in or K)
            self.tensor(site, f"B_{part}", (w_out, r), "zeros", group, mtype="all")    # shared B (D_out or K, r)
            if self.kron:
                self.tensor(site, f"sA_{part}", (1, self.d_in // K), "kaiming")       # σ_A (1, d_in/K)
                self.tensor(site, f"sB_{part}", (self.d_out // K, 1), "kaiming")      # σ_B (d_out/K, 1)

    def parts(self):
        """The (A (r_p, d_in), B (d_out, r_p)) pairs this module applies: local, then the shared ones transformed."""
        out = [(self.A, self.B)] if self.ranks["local"] else []
        for part in ("intra", "inter"):
            if self.ranks[part]:
                A, B = val(getattr(self, f"A_{part}")), val(getattr(self, f"B_{part}"))
                if self.kron:
                    out.append((torch.kron(getattr(self, f"sA_{part}"), A), torch.kron(getattr(self, f"sB_{part}"), B)))
                else:
                    out.append((A[:, self.cut_in], B[self.cut_out]))
        return out

    def stacked(self):
        """[A; A_intra'; A_inter'] (r_l + r_intra + r_inter, d_in) and [B | B_intra' | B_inter'] (d_out, same)."""
        parts = self.parts()
        return torch.cat([A for A, _ in parts]), torch.cat([B for _, B in parts], dim=1)

    # Zhou et al. 2025 (BSLoRA): y = W0 x + s (B A + T(B_intra, A_intra) + T(B_inter, A_inter)) x̃, T the shape
    # transformation. One dropout mask for the three (the authors' code calls dropout per part: with p > 0
    # that draws three masks). Unlike RaSA, the three pairs are concatenated (a copy of r_total·(d_in + d_out)
    # floats per call): the slices are strided anyway, and one rank-r_total pair measured ~2.5x faster on CPU
    # than three small ones (hidden 1024, d_ff 2816, 512 tokens, forward + backward).
    def adapt(self, x, y):
        A, B = self.stacked()
        h, _ = self.project(x, A)            # (n, r_l + r_intra + r_inter)
        return self.add_lowrank_(y, h, B)

    def delta_weight(self):  # ΔW = s Σ_parts B_p A_p, fp32 (d_out, d_in)
        A, B = self.stacked()
        return self.s * (B @ A)


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
        (d_in_max, d_out_max), dev = site.d_max, self.weight.device
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
        bank = lambda: self.init(site, (self.h, self.b), "uniform", bound=self.BANK_BOUND)   # (h, b)
        self.bank = site.banks.shared("all", "bank", 0, bank)
        self.tensor(site, "logits_A", (self.r, self.d_in // self.b, self.h), "normal", std=self.LOGITS_STD)   # (r, d_in/b, h)
        self.tensor(site, "logits_B", (self.d_out // self.b, self.r, self.h), "normal", std=self.LOGITS_STD)  # (d_out/b, r, h)

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
            "loramoe": LoRAMoE, "moelora": MoELoRA, "mtllora": MTLLoRA, "cola": CoLA, "multilora": MultiLoRA,
            "bslora": BSLoRA, "vera": VeRA, "vblora": VBLoRA, "prompt_tuning": PromptTuning, "p_tuning_v2": PTuningV2}

# -----------------------------------------------------------------------------
# injection and reporting


def inject(model, acfg, tasks=None):
    """Wrap every nn.Linear whose name ends in one of acfg's targets with ADAPTERS[acfg.adapter], freeze every
    base parameter, attach `model.adapter_banks` and `model.adapter_config`; return the trainable params
    (each once). A prompt method wraps nothing: it becomes `model.soft_prompt`, which the forward consults.
    Inject after the base weights are loaded: DoRA's m starts at the row norms of W0, prompt tuning's P_e at
    rows of embed_tokens. tasks (task-gated adapters only): the names of task ids 0..T-1, kept as
    `model.adapter_tasks` and saved with the adapter, so evaluation can map a subject's name to its id."""
    acfg.validate()
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("model already has an adapter: inject into a freshly loaded base model")
    if acfg.adapter in PROMPTS and not isinstance(model, Transformer):
        raise ValueError(f"{acfg.adapter} needs model.py's Transformer (its forward reads model.soft_prompt), "
                         f"got {type(model).__name__}")
    if tasks is not None:
        if acfg.adapter not in TASK_GATED:
            raise ValueError(f"task names are for task-gated adapters ({', '.join(TASK_GATED)}), not {acfg.adapter}")
        if len(tasks) != acfg.num_tasks:
            raise ValueError(f"{len(tasks)} task names for num_tasks={acfg.num_tasks}: give one name per task id")
    if acfg.adapter in PROMPTS:
        for p in model.parameters():
            p.requires_grad_(False)
        model.soft_prompt = ADAPTERS[acfg.adapter](model, acfg, torch.Generator().manual_seed(acfg.seed))
        model.soft_prompt.train(model.training)  # a model in eval mode gets no dropout from what we add
        model.adapter_banks, model.adapter_config = Banks().train(model.training), acfg
        return [p for p in model.parameters() if p.requires_grad]
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in acfg.target_list]
    if not found:
        raise ValueError(f"no module matched targets {acfg.targets!r}: the model has no nn.Linear with those names")
    layer = lambda n: int(m.group(1)) if (m := re.search(r"(?:^|\.)(\d+)\.", n)) else 0  # model.layers.<l>.
    L = 1 + max(layer(n) for n, _ in found)
    d_max = (max(m.in_features for _, m in found), max(m.out_features for _, m in found))
    banks, gen = Banks(), torch.Generator().manual_seed(acfg.seed)
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
    for m in [banks] + [a for _, a in wrapped]:  # what we add starts in the model's mode: a model in eval mode
        m.train(model.training)                  # (load_adapter onto it) gets no dropout
    model.adapter_config = acfg
    if acfg.adapter in TASK_GATED:
        model.adapter_tasks = None if tasks is None else [str(t) for t in tasks]
    return [p for p in model.parameters() if p.requires_grad]


def set_task(model, task_ids):
    """Set the task of each example for the next forwards of every task-gated adapter (MoELoRA, MTL-LoRA):
    task_ids (B,) ints in [0, num_tasks), one per example (row of the batch), or one int for the whole batch;
    None clears them. train.py and eval_mmlu.py call it before each forward."""
    mods = [m for m in model.modules() if isinstance(m, TaskGated)]
    if not mods:
        raise ValueError(f"set_task: the model has no task-gated adapter ({', '.join(TASK_GATED)}); task ids only "
                         f"steer those")
    t = None
    if task_ids is not None:
        t = torch.as_tensor(task_ids).reshape(-1)
        T = model.adapter_config.num_tasks
        if t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"task ids must be integers, one per example, got {task_ids!r}")
        if bool(((t < 0) | (t >= T)).any()):
            raise ValueError(f"task ids must be in [0, {T}) (the adapter's num_tasks), got "
                             f"{sorted(set(t.tolist()))[:8]}: map task names with the adapter's tasks")
        t = t.to(device=mods[0].weight.device, dtype=torch.long)
    for m in mods:
        m.task_ids = t


def aux_loss(model):
    """The auxiliary loss of the last training forward, or None: LoRAMoE's balance loss β·Σ_modules L_lbc (its
    modules record L_lbc only in training mode and with β = loramoe_beta > 0). Each recorded term is handed
    out once (then cleared), so a stale one is never added to a later step."""
    terms = []
    for m in model.modules():
        if isinstance(m, LoRAMoE) and m.balance is not None:
            terms.append(m.balance)
            m.balance = None
    return model.adapter_config.loramoe_beta * torch.stack(terms).sum() if terms else None


def adapter_params(model):
    """{state-dict name: Parameter} of every adapter tensor, each once (banks under adapter_banks.*, a soft
    prompt's under soft_prompt.*)."""
    out = {}
    if getattr(model, "soft_prompt", None) is not None:
        out.update({f"soft_prompt.{n}": p for n, p in model.soft_prompt.named_parameters()})
    for mname, mod in model.named_modules():
        if isinstance(mod, Adapter):
            out.update({f"{mname}.{n}": p for n, p in mod.named_parameters(recurse=False) if n not in ("weight", "bias")})
    out.update({f"adapter_banks.{n}": p for n, p in getattr(model, "adapter_banks", Banks()).named_parameters()})
    return out


def _mtype(name):
    """Module type of an adapter tensor's name: q_proj ...; "all" for a tensor every type shares (adapter_banks.all.*)."""
    parts = name.split(".")
    return next((part for part in parts if part in TARGETS), "all" if parts[:2] == ["adapter_banks", "all"] else "other")


def param_report(model):
    """{"trainable", "base", "percent" (100·trainable/(base+trainable), the papers' "Params %"), "by_type"}; for
    MASA also "masa": both counts, the equations' (agg=sum, no router) and the paper's (router counted); for
    MoSA also "mosa": the partitions (one per distinct shape) and the bytes of their index tensors; for the prompt
    methods (no projection adapted, by_type empty) also "prompt": P, the formula, and what is trained vs used; for
    the task-gated adapters also "tasks" (T and the names). A tensor of no module type (MoELoRA's task gate, one
    for the whole model) is counted in by_type["global"]; for CoLA
    with svd init a "cola" note (the base was modified). by_type["all"]: tensors every type shares (BSLoRA)."""
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
    for name, p in ad.items():  # tensors no single type owns: BSLoRA's adapter_banks.all.* ("all"), MoELoRA's gate ("global")
        if name.startswith("soft_prompt."):
            continue
        t = _mtype(name)
        t = "global" if t == "other" else t
        by_type.setdefault(t, dict(modules=0, d_in=None, d_out=None, trainable=0))["trainable"] += p.numel()
    rep = dict(trainable=trainable, base=base, percent=pct(trainable), by_type=by_type)
    sp = getattr(model, "soft_prompt", None)
    if isinstance(sp, PromptTuning):
        rep["prompt"] = dict(P=sp.P, formula=f"P·hidden = {sp.P}·{sp.C}", note=(
            "trained and saved: P_e (P, hidden); targets, r and alpha do not apply; every sequence is P tokens "
            "longer in compute and in the KV cache"))
    if isinstance(sp, PTuningV2):
        kv = 2 * sp.L * sp.P * sp.n_kv * sp.D  # the keys/values the forward uses
        rep["prompt"] = dict(P=sp.P, prefix=kv, formula=f"2·L·P·n_kv·head_dim = 2·{sp.L}·{sp.P}·{sp.n_kv}·{sp.D}" + (
            " + MLP: P·hidden + (hidden + 1)·h + (h + 1)·2·L·n_kv·head_dim" if sp.projection else ""), note=(
            "trained and saved: the prefix itself; targets, r and alpha do not apply" if not sp.projection else
            f"trained and saved: E and the MLP ({trainable:,}; saved whole, so a reload is exact and resumable); "
            f"the forward only uses the {kv:,} keys/values they produce (peft's inference save keeps only those)"))
    acfg = getattr(model, "adapter_config", None)
    if acfg is not None and acfg.adapter in TASK_GATED:
        rep["tasks"] = dict(num_tasks=acfg.num_tasks, names=getattr(model, "adapter_tasks", None))
    if acfg is not None and acfg.adapter == "cola" and acfg.cola_init == "svd":
        rep["cola"] = dict(note="cola_init=svd replaced each adapted W0 by its residual W0 - (top-r part), which the "
                                "adapter holds: the adapter is valid on that residual only (adapter.json keeps its checksum)")
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
        all_types = by_type["all"]["trainable"]  # the bank h·b, shared by every module type
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
    return [m for m in model.modules() if isinstance(m, (Adapter, SoftPrompt))]


def _check_mergeable(model, mods, task):
    """Refuse (one line) a merge that cannot be done, before anything is touched."""
    for m in mods:
        if m.not_mergeable:
            raise ValueError(m.not_mergeable)
    gated = mods[0].task_gated
    if gated and task is None:
        raise ValueError(f"{model.adapter_config.adapter} is task-gated: its merged weight is per task; merge one task "
                         f"with merge(model, task=t) (export_merged(model, dir, task=t))")
    if not gated and task is not None:
        raise ValueError(f"task={task}: {model.adapter_config.adapter} is not task-gated; merge it without task=")
    if gated and not (isinstance(task, int) and 0 <= task < model.adapter_config.num_tasks):
        raise ValueError(f"task must be an int in [0, {model.adapter_config.num_tasks}), got {task!r}")


def merge(model, task=None):
    """W0 <- merged weight in every adapted module (fp32 compute, rounded once to W0's dtype). The original
    W0 tensors are kept (one extra copy of each adapted weight) so unmerge() restores them bit for bit.
    Task-gated adapters (MoELoRA, MTL-LoRA) merge one task: merge(model, task=t) folds ΔW_t into W0."""
    mods = _adapters(model)
    _check_mergeable(model, mods, task)
    for m in mods:
        m.merge(task) if m.task_gated else m.merge()


def unmerge(model):
    for m in _adapters(model):
        m.unmerge()


def save_adapter(model, out_dir, tensors=None):
    """Write out_dir/adapter.safetensors (adapter tensors only, fp32) and out_dir/adapter.json (method,
    every hyperparameter, the base config's fingerprint), each atomically, weights first. tensors: {name: whole
    tensor} to write instead of the model's own (train.py --fsdp gathers them from the shards), same names."""
    _adapters(model)
    acfg, out = model.adapter_config, Path(out_dir)
    own = adapter_params(model)
    if tensors is not None and set(tensors) != set(own):
        raise ValueError(f"save_adapter: tensors name {sorted(set(tensors) ^ set(own))[:3]} unlike the model's adapter")
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: p.detach().cpu().contiguous() for k, p in (own if tensors is None else tensors).items()}
    meta = dict(format="nanomasa-adapter-v1", method=acfg.adapter, config=asdict(acfg),
                base_fingerprint=model.config.fingerprint(), base_layers=model.config.n_layers,
                base_hidden=model.config.hidden_size)
    if acfg.adapter in TASK_GATED:
        meta["tasks"] = getattr(model, "adapter_tasks", None)  # names of task ids 0..T-1 (None: unknown)
    if acfg.adapter == "mosa":
        meta["partitions"] = _partitions(model)
    if acfg.adapter == "cola" and acfg.cola_init == "svd":
        meta["cola_bases"] = _cola_bases(model)
    if acfg.adapter == "vera":
        meta["vera_projection"] = _vera_projection(model)
    # The weights' file carries the hyperparameters it was trained with (and the base's content fingerprint is in
    # adapter.json): load_adapter then refuses an adapter.json edited afterwards (a changed alpha would
    # otherwise rescale every update without a word).
    meta["base_weights"] = getattr(model, "base_weights", None)  # model.weights_fingerprint of the loaded base
    tag = {"format": "pt", "adapter_config": json.dumps(meta["config"], sort_keys=True)}
    write_atomic(out / "adapter.safetensors", lambda p: save_file(sd, p, metadata=tag))
    write_atomic(out / "adapter.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def _partitions(model):
    """MoSA: [partition_meta() of each distinct (shape, K)] (a checksum is computed once per partition)."""
    parts = {}
    for m in model.modules():
        if isinstance(m, MoSA) and (m.d_out, m.d_in, m.K) not in parts:
            parts[m.d_out, m.d_in, m.K] = m.partition_meta()
    return list(parts.values())


def _cola_bases(model):
    """CoLA (svd init): {module name: checksum of the plain base weight W0 its residual W_res was derived from}.
    Not W_res's own checksum: the SVD is reproducible only up to rounding across thread counts and devices."""
    return {n: m.base_checksum for n, m in model.named_modules() if isinstance(m, CoLA)}
def _vera_projection(model):
    """VeRA: projection_meta() of the model's one frozen pair (shapes, seed, checksum)."""
    return next(m for m in model.modules() if isinstance(m, VeRA)).projection_meta()


def load_adapter(model, adapter_dir):
    """Inject the adapter described by adapter_dir/adapter.json into `model` and load its weights exactly.
    Refuses a model whose config fingerprint differs from the one the adapter was trained on, (MoSA) a
    partition rebuilt from the saved seed whose checksum differs from the saved one, and (CoLA, svd init) a
    residual base rebuilt from `model` whose checksum differs from the saved one: `model` must be the plain base
    the adapter was trained on; likewise VeRA's frozen pair rebuilt from the saved seed. A refused load leaves
    `model` as it was."""
    d = Path(adapter_dir)
    for f in ("adapter.json", "adapter.safetensors"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"no {f} in {d}: pass a directory written by save_adapter")
    meta = read_adapter_json(d)
    fp = model.config.fingerprint()
    if meta["base_fingerprint"] != fp:
        raise ValueError(f"adapter in {d} was trained on a base with config fingerprint {meta['base_fingerprint']} "
                         f"(L={meta.get('base_layers')}, d={meta.get('base_hidden')}), this model's is {fp}: "
                         f"load the base model it was trained on")
    saved, now = meta.get("base_weights"), getattr(model, "base_weights", None)
    if saved and now and saved != now:  # same shapes, other weights (e.g. the instruct variant of the base)
        raise ValueError(f"adapter in {d} was trained on a base with weights fingerprint {saved}, this model's is {now} "
                         f"(same shapes, other weights): load the base model it was trained on")
    acfg = AdapterConfig(**meta["config"])
    if getattr(model, "adapter_config", None) is not None:
        if asdict(model.adapter_config) != asdict(acfg):
            raise ValueError(f"model already has a different adapter ({model.adapter_config.adapter}): load into a fresh base")
        _load_into(model, acfg, meta, d)
        return acfg
    # references, not copies: CoLA's svd init gives an adapted weight a new tensor (its residual), so the old
    # one stays alive (one extra copy of the adapted weights) until the load has succeeded
    before = [(p, p.requires_grad, p.data) for p in model.parameters()]
    inject(model, acfg, tasks=meta.get("tasks"))
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
        model.soft_prompt = None
        model.__dict__.pop("adapter_tasks", None)
        for p, g, data in before:
            p.requires_grad_(g)
            p.data = data
        raise
    return acfg


def read_adapter_json(d):
    """adapter.json of folder d, checked: an object with a config of AdapterConfig's fields and types."""
    f = d / "adapter.json"
    fix = "restore it, or save the adapter again"
    meta = read_json(f, fix=fix)
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("base_fingerprint"), str):
        raise LoadError(f"{f}: no 'config' object and 'base_fingerprint' string, not written by save_adapter: {fix}")
    unknown = set(meta["config"]) - {f.name for f in fields(AdapterConfig)}
    if unknown:
        raise LoadError(f"{f} has unknown fields {sorted(unknown)}: it was written by a newer nanoMASA")
    check_field_types(AdapterConfig, meta["config"], f)
    return meta


def read_adapter_weights(d, config):
    """adapter.safetensors of folder d, checked before use: complete, saved with this adapter.json's config
    (when the file records it), floating point and finite everywhere."""
    f = d / "adapter.safetensors"
    safetensors_header(f)  # truncated or corrupt: one line
    with safe_open(str(f), framework="pt") as st:
        tag = (st.metadata() or {}).get("adapter_config")
    if tag is not None:
        was = json.loads(tag)
        if changed := [k for k in sorted(set(was) | set(config)) if was.get(k) != config.get(k)]:
            k = changed[0]
            raise LoadError(f"{d / 'adapter.json'}: {k} is {config.get(k)!r} but the weights were trained with {k}="
                            f"{was.get(k)!r}: restore adapter.json (its hyperparameters must be the trained ones)")
    sd = load_file(str(f))
    for k, t in sd.items():
        if not t.is_floating_point():
            raise LoadError(f"{f}: {k} is stored as {str(t.dtype).removeprefix('torch.')}, not floating point: "
                            f"the file was not written by save_adapter; save the adapter again")
        if not torch.isfinite(t).all():
            raise LoadError(f"{f}: {k} holds NaN or infinite values: the training diverged or the file is damaged; "
                            f"use an earlier adapter or train again")
    return sd


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
    if acfg.adapter == "cola" and acfg.cola_init == "svd":  # A, B mean something on the residual they left only
        saved = meta.get("cola_bases", {})
        for name, got in _cola_bases(model).items():
            if saved.get(name) != got:
                raise ValueError(f"CoLA base weight of {name} in this model has checksum {got}, {d / 'adapter.json'} "
                                 f"says {saved.get(name)}: load onto the original plain base the adapter was trained on "
                                 f"(not another checkpoint, not a residual base saved after inject)")
    if acfg.adapter == "vera":  # d and b mean nothing on other random matrices: prove we rebuilt the saved pair
        p, saved = _vera_projection(model), meta.get("vera_projection", {})
        if saved.get("checksum") != p["checksum"]:
            raise ValueError(f"VeRA projections A {p['A']}, B {p['B']} rebuilt from seed {p['seed']} have checksum "
                             f"{p['checksum']}, {d / 'adapter.json'} says {saved.get('checksum')}: this torch draws other "
                             f"random matrices; load with the torch and nanoMASA versions that trained it")
    sd, own = read_adapter_weights(d, meta["config"]), adapter_params(model)
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


def export_merged(model, out_dir, task=None):
    """A plain Hugging Face checkpoint (config.json + model.safetensors, base dtype) with every adapter
    merged (fp32 compute, rounded once), loadable by transformers. The model itself is left unchanged.
    Task-gated adapters export one task's model: export_merged(model, dir, task=t)."""
    mods = _adapters(model)
    _check_mergeable(model, mods, task)
    if task is not None and any(m.merged and m.merged_task != task for m in mods):  # its W0 holds another ΔW_t
        raise ValueError(f"the model is merged for another task: unmerge(model) before export_merged(task={task})")
    skip = set(adapter_params(model))
    sd = {k: v for k, v in model.state_dict().items() if k not in skip}
    for name, m in model.named_modules():
        if isinstance(m, Adapter) and not m.merged:
            sd[f"{name}.weight"] = m.merged_weight(task) if m.task_gated else m.merged_weight()
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
    lines = [f"{spec} + {acfg.adapter}: " + " ".join(f"{k}={v}" for k, v in asdict(acfg).items()
                                                     if k != "adapter" and v is not None)]
    if rep["by_type"]:  # empty for the prompt methods: they adapt no projection
        lines.append(f"{'module':<10} {'count':>5} {'d_in x d_out':>13} {'trainable':>13}")
    for t, e in rep["by_type"].items():
        shape = "-" if e["d_in"] is None else f"{e['d_in']} x {e['d_out']}"
        lines.append(f"{t:<10} {e['modules']:>5} {shape:>13} {e['trainable']:>13,}")
    lines.append(f"trainable {rep['trainable']:,} | base {rep['base']:,} | "
                 f"params % = 100·trainable/(base+trainable) = {rep['percent']:.4f}%")
    if "masa" in rep:
        m = rep["masa"]
        lines.append(f"MASA equations (agg=sum, no router): {m['equations_sum']['trainable']:,} "
                     f"({m['equations_sum']['percent']:.4f}%); paper's count (router counted): "
                     f"{m['paper_router']['trainable']:,} ({m['paper_router']['percent']:.4f}%)")
    if "prompt" in rep:
        lines.append(f"{acfg.adapter}: P = {rep['prompt']['P']} virtual tokens, {rep['prompt']['formula']}; "
                     f"{rep['prompt']['note']}")
    if "tasks" in rep:
        lines.append(f"task-gated: {rep['tasks']['num_tasks']} tasks; the update of example b depends on its task "
                     f"id (set_task); merged one task at a time" +
                     (" (global: MoELoRA's task gate E (T, d_T) + W_T (N, d_T), once for the model)"
                      if acfg.adapter == "moelora" else ""))
    if "cola" in rep:
        lines.append(f"CoLA: {rep['cola']['note']}")
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
    with one_line_errors():
        acfg = dataclass_from_args(AdapterConfig, a)
        model = meta_model(a.model)
        inject(model, acfg)
        rep = param_report(model)
    print(json.dumps(dict(model=a.model, adapter=asdict(acfg), **rep), indent=2) if a.json else format_report(rep, a.model, acfg))


if __name__ == "__main__":
    main()
