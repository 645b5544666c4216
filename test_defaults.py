"""What every method and script means when a flag is left out, pinned against ../shared/SPEC.md and the papers
(the values are written here as literals from those sources, never read from the code's constants), and the
layout the defaults build: `AdapterConfig(adapter="masa")` must be MASA as the paper and SPEC define it."""
import dataclasses
import math

import pytest
import torch

import adapters
import eval_mmlu
import prepare_data
import train
from adapters import AdapterConfig, inject
from model import ModelConfig, Transformer

ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # SPEC: "Default targets: all seven projections"

# Every AdapterConfig field's default when only `adapter` is given: first what every method shares (SPEC's
# preamble: r = 8, alpha = 16, all seven projections; the MASA and the other knobs at their papers' values),
# then each method's departures, with their source.
COMMON = dict(
    r=8, alpha=16.0, dropout=0.0, targets=ALL7, rslora=False, num_a=1, num_b=1,
    share_group=2, share="a", agg="sum",          # SPEC, MASA: S = 2, share A, agg = "sum" (Eq. 4-5)
    rasa_k=None, mosa_k=None,                      # only RaSA / MoSA take a value (below; MoSA's K follows r)
    num_virtual_tokens=20, prompt_init="vocab",    # Lester et al. 2021 §3.2: P = 20, init from vocabulary rows
    prefix_projection=False, prefix_hidden=512,    # P-tuning v2's code: no reparameterisation, hidden 512
    num_tasks=None, loramoe_beta=None, moelora_dim=None, mtllora_tau=None,
    cola_init="svd",                               # CoLA: principal singular components of W0
    bs_r_local=2, bs_r_intra=4, bs_r_inter=8, bs_share="slice", bs_kron_size=256,  # BSLoRA's ranks and slice sharing
    vera_d_init=0.1,                               # VeRA Tables 6c, 8: d_init = 0.1
    vb_num_vectors=2048, vb_vector_len=256, vb_topk=2,  # VB-LoRA §4.3 (Llama 2): h = 2048, b = 256, k = 2
    seed=0)
METHOD = {
    "lora": {}, "dora": {}, "hydralora": {},
    "masa": dict(num_a=5),                                            # SPEC: r = 8, alpha = 16, N = 5, S = 2, n_B = 1
    "rasa": dict(rasa_k=1),                                           # SPEC: k = r / 8 rounded down, at least 1
    "mosa": dict(r=32, targets="q_proj,k_proj,v_proj,up_proj,down_proj"),  # SPEC: q,k,v,up,down at LoRA r = 32's budget
    "loramoe": dict(r=4, alpha=32.0, targets="gate_proj,up_proj,down_proj", num_a=6, num_b=6,
                    loramoe_beta=0.0),                                # LoRAMoE: FFN only, N = 6 experts of rank 4
    "moelora": dict(r=16, alpha=32.0, num_a=8, num_b=8, moelora_dim=64),  # MOELoRA's moelora.bash, arguments.py
    "mtllora": dict(targets="q_proj,k_proj,v_proj,o_proj", num_b=3, mtllora_tau=0.1),  # MTL-LoRA's qkvo script
    "cola": dict(num_a=2, num_b=3),                                   # CoLA: M = 2 A's, N = 3 B's
    "multilora": dict(num_a=3, num_b=3),                              # MultiLoRA: n = 3 parallel LoRAs
    "bslora": {},
    "vera": dict(r=1024),                                             # VeRA Table 9
    "vblora": dict(r=4),                                              # VB-LoRA §4.3
    "prompt_tuning": dict(targets=""), "p_tuning_v2": dict(targets=""),  # prompts adapt no projection
}


def test_the_table_covers_every_method_and_every_field():
    assert set(METHOD) == set(adapters.ADAPTERS)  # a new method gets its row here
    assert set(COMMON) | {"adapter"} == {f.name for f in dataclasses.fields(AdapterConfig)}  # a new field too


@pytest.mark.parametrize("name", sorted(METHOD))
def test_every_method_default_is_the_spec_and_paper_value(name):
    want = {"adapter": name, **COMMON, **METHOD[name]}
    assert dataclasses.asdict(AdapterConfig(adapter=name)) == want
    # the command line (adapters.py, train.py, eval) leaves the same values when the flags are left out
    import argparse
    ap = adapters.add_dataclass_args(argparse.ArgumentParser(), AdapterConfig)
    assert dataclasses.asdict(adapters.dataclass_from_args(AdapterConfig, ap.parse_args(["--adapter", name]))) == want


def test_default_scaling_is_alpha_over_r():
    assert AdapterConfig(adapter="masa").scaling == 2.0          # 16 / 8
    assert AdapterConfig(adapter="lora", rslora=True).scaling == 16 / math.sqrt(8)
    assert AdapterConfig(adapter="loramoe").scaling == 8.0       # 32 / 4


@pytest.mark.parametrize("r,k", [(1, 1), (4, 1), (7, 1), (8, 1), (15, 1), (16, 2), (23, 2), (24, 3), (64, 8)])
def test_rasa_k_is_r_over_8_rounded_down_at_least_1(r, k):
    assert AdapterConfig(adapter="rasa", r=r).rasa_k == k
    assert AdapterConfig(adapter="rasa", r=r, rasa_k=r).rasa_k == r  # an explicit k is kept


def tiny(L=3, hidden=32, inter=48, kv=2):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=61, hidden_size=hidden, intermediate_size=inter, n_layers=L,
                                   n_heads=4, n_kv_heads=kv, head_dim=hidden // 4))


def test_default_masa_is_the_papers_layout():
    """L = 3 layers, S = 2: groups {0, 1} and {2}; per module type and group ONE bank of N = 5 experts (5, 8, d_in);
    per layer its own B (d_out, 8), zero; no router; s = 2; mergeable (agg = sum); all seven projections."""
    model = tiny(L=3)
    params = inject(model, AdapterConfig(adapter="masa"))
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, adapters.Adapter):
            l, t = int(name.split(".")[2]), name.split(".")[-1]
            shapes[t] = (mod.d_out, mod.d_in)
            A, B = adapters.val(mod.A), mod.B
            assert isinstance(mod.A, adapters.Shared) and isinstance(B, torch.nn.Parameter), name  # A shared, B not
            assert A.shape == (5, 8, mod.d_in) and B.shape == (mod.d_out, 8) and not B.any()
            assert A is model.adapter_banks[t]["A"][str(l // 2)]
            assert not hasattr(mod, "R") and not hasattr(mod, "R_B") and mod.s == 2.0 and mod.not_mergeable is None
            assert isinstance(mod.drop, torch.nn.Identity)  # dropout 0
    assert sorted(shapes) == sorted(ALL7.split(","))
    # SPEC's count per type: ceil(L/S)·N·r·d_in + L·r·d_out
    assert sum(p.numel() for p in params) == sum(2 * 5 * 8 * d_in + 3 * 8 * d_out for d_out, d_in in shapes.values())
    assert set(model.adapter_banks[t]["A"]) == {"0", "1"} and "B" not in model.adapter_banks[t]
    a0 = model.adapter_banks["q_proj"]["A"]["0"]
    assert not torch.equal(a0[0], a0[1]) and a0.abs().max() <= 1 / math.sqrt(32)  # independent Kaiming experts


def test_default_rasa_and_mosa_build_their_spec_shapes():
    model = tiny(L=3)
    inject(model, AdapterConfig(adapter="rasa"))  # r = 8, k = 1: private rank 7, a pool of k·L = 3 ranks
    q = model.model.layers[1].self_attn.q_proj
    assert q.A.shape == (7, 32) and adapters.val(q.A_S).shape == (3, 32) and q.s == 1.0
    torch.testing.assert_close(q.D, torch.tensor([16 / 14] * 7 + [16 / 6] * 3))  # alpha/(2(r-k)), alpha/(2kL)
    # MoSA: K = 32 (h + d) scalars per adapted weight (needs h·d >= K: hidden 64, no GQA), on q,k,v,up,down only
    model = tiny(L=2, hidden=64, inter=96, kv=4)
    inject(model, AdapterConfig(adapter="mosa"))
    got = {n.split(".")[-1]: m.lam.numel() - 32 * (m.d_out + m.d_in)
           for n, m in model.named_modules() if isinstance(m, adapters.Adapter)}
    assert sorted(got) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"] and set(got.values()) == {0}


def test_train_defaults_are_the_papers_recipe():
    """SPEC "Training recipe": AdamW lr 5e-5, cosine, batch 8 x accumulation 8, 5 epochs, cutoff 1024; what the
    recipe leaves open takes Hugging Face Trainer's / Alpaca's values (warmup 3%, no decay, clip 1, to lr 0)."""
    want = dict(lr=5e-5, min_lr=0.0, batch_size=8, grad_accum=8, epochs=5.0, cutoff=1024, dtype="auto",
                warmup_ratio=0.03, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, max_steps=0,
                stop_after=0, seed=0, init_scale=65536.0, resume=False, grad_checkpoint=False, compile=False)
    cfg, acfg = train.parse_args(["--model", "m", "--data", "d"])
    got = dataclasses.asdict(cfg)
    assert {k: got[k] for k in want} == want
    assert dataclasses.asdict(train.TrainConfig(model="m", data="d")) == got
    # train.py's method is MASA with SPEC's defaults (N = 5, S = 2, share A, sum, r = 8, alpha = 16)
    assert dataclasses.asdict(acfg) == {"adapter": "masa", **COMMON, **METHOD["masa"]}
    # prepare_data: 10% validation split, cutoff 1024; evaluation zero-shot (SPEC: "Evaluation zero-shot")
    d = prepare_data.parse_args(["synthetic", "--out", "o", "--model", "m"])
    assert (d.val_frac, d.cutoff) == (0.1, 1024)
    assert eval_mmlu.parse_args(["--model", "m", "--data", "d"]).shots == 0


@pytest.mark.parametrize("kw", [dict(adapter="lora"), dict(adapter="dora"), dict(adapter="hydralora", num_b=3),
                                dict(adapter="masa", agg="router", num_b=2), dict(adapter="rasa"),
                                dict(adapter="loramoe", targets=ALL7), dict(adapter="cola", cola_init="lora"),
                                dict(adapter="multilora")])
def test_a_like_matrices_start_kaiming_uniform_with_a_sqrt5(kw):
    """SPEC: every A-like matrix (and router, nn.Linear's default) starts kaiming_uniform_(a=sqrt(5)), i.e.
    U(-1/sqrt(d_in), 1/sqrt(d_in)); MultiLoRA's B likewise over its fan-in r. Checked by the range and the
    spread of the draws in units of the bound (every tensor within it, reaching past 0.9 of it; the pooled
    standard deviation within 3% of a uniform's 1/sqrt(3), over thousands of draws)."""
    model = tiny(L=2, hidden=64, inter=96, kv=4)
    inject(model, AdapterConfig(**kw))
    units = []
    for name, p in adapters.adapter_params(model).items():
        leaf = name.split(".")[-2] if name.startswith("adapter_banks.") else name.split(".")[-1]
        if leaf not in ("A", "A_S", "R", "R_B", "W_g") and not (kw["adapter"] == "multilora" and leaf == "B"):
            continue
        u = p.detach().flatten() * math.sqrt(p.shape[-1])  # in units of 1/sqrt(fan-in): d_in (r for MultiLoRA's B)
        assert u.abs().max() <= 1 and u.abs().max() > 0.9, name
        units.append(u)
    u = torch.cat(units)
    assert len(units) >= 7 and u.numel() > 5000
    assert abs(u.std().item() * math.sqrt(3) - 1) < 0.03 and abs(u.mean().item()) < 0.03
