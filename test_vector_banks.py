"""Tests of VeRA and VB-LoRA (adapters.py) against references rebuilt here: peft's VeRA and VB-LoRA on a tiny
transformers model (same frozen pair / bank, same vectors / logits: outputs and gradients), the dense formulas
written out with torch.diag and with explicit loops over sub-vectors, the papers' parameter formulas, an untied
per-module copy of the bank, a fresh process rebuilding VeRA's random pair from the saved seed. Tiny shapes; run:
    python -m pytest -q test_vector_banks.py
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import adapters
import kernels
from adapters import TARGETS, AdapterConfig, inject, load_adapter, param_report, save_adapter, val
from conftest import make_hf_checkpoint
from model import ModelConfig, Transformer
from test_adapters import (adapted, reload_in_fresh_process, bias_of, check_cli_error,
                           check_export_merged_round_trip, check_forward_equals_dense, check_identity_at_init,
                           check_merge_unmerge, check_save_load_round_trip, load_ours, loss_of, meta_report,
                           randomize, shapes, tiny_model)

HERE = Path(__file__).parent

# tiny model: hidden 32, q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48, L = 5
VARIANTS = {
    "vera": dict(adapter="vera", r=8),
    "vera_r3_d1": dict(adapter="vera", r=3, vera_d_init=1.0, targets="k_proj,up_proj,down_proj"),  # 3 slice shapes
    "vblora": dict(adapter="vblora", r=4, vb_num_vectors=12, vb_vector_len=8),                       # k = 2
    "vblora_k3_b16": dict(adapter="vblora", r=3, vb_num_vectors=5, vb_vector_len=16, vb_topk=3),
}
VERA = [n for n in VARIANTS if n.startswith("vera")]
VBLORA = [n for n in VARIANTS if n.startswith("vblora")]


def acfg_of(name, **kw):
    return AdapterConfig(**{**VARIANTS[name], **kw})


def vera_pair(model):
    """The model's one frozen pair, read by name from its buffers."""
    B = dict(model.named_buffers())
    return B["adapter_banks.vera_A"], B["adapter_banks.vera_B"]


def vera_weight(model, name, mod):
    """VeRA's Eq. 2 as a weight: W0 + diag(b) B[:d_out, :] diag(d) A[:, :d_in], with torch.diag."""
    P = dict(model.named_parameters())
    A, B = vera_pair(model)
    d, b = P[f"{name}.d"], P[f"{name}.b"]
    return mod.weight + torch.diag(b) @ B[:mod.d_out] @ torch.diag(d) @ A[:, :mod.d_in]


def vblora_factors(model, name):
    """A (r, d_in) and B (d_out, r) rebuilt sub-vector by sub-vector with explicit loops (VB-LoRA Eq. 3.1-3.3):
    the k largest logits of a row found by a descending sort, their softmax written out, the weighted sum of those
    bank vectors; row i of A is cut into d_in/b pieces, column i of B into d_out/b pieces."""
    P, acfg = dict(model.named_parameters()), model.adapter_config
    bank, LA, LB = P["adapter_banks.all.bank.0"], P[f"{name}.logits_A"], P[f"{name}.logits_B"]
    b, k = acfg.vb_vector_len, acfg.vb_topk

    def sub(logits):  # (h,) -> (b,)
        top = torch.argsort(logits, descending=True)[:k]
        w = torch.exp(logits[top] - logits[top].max())
        return sum(w[j] / w.sum() * bank[top[j]] for j in range(k))
    r, nA, nB = LA.shape[0], LA.shape[1], LB.shape[0]
    A, B = torch.zeros(r, nA * b), torch.zeros(nB * b, r)
    for i in range(r):
        for j in range(nA):
            A[i, j * b:(j + 1) * b] = sub(LA[i, j])
        for t in range(nB):
            B[t * b:(t + 1) * b, i] = sub(LB[t, i])
    return A, B


def vblora_weight(model, name, mod):
    A, B = vblora_factors(model, name)
    return mod.weight + B @ A


def dense_weight(model, name, mod):
    return (vera_weight if isinstance(mod, adapters.VeRA) else vblora_weight)(model, name, mod)


def spec_count(acfg, L, d_in, d_out):
    """Trainable parameters per module type. VeRA (§3.2): L·(r + d_out), the frozen pair not counted. VB-LoRA: the
    logits, h per sub-vector, r·d_in/b + r·d_out/b sub-vectors per module; its bank h·b is counted once, globally."""
    if acfg.adapter == "vera":
        return L * (acfg.r + d_out)
    return L * acfg.vb_num_vectors * acfg.r * (d_in // acfg.vb_vector_len + d_out // acfg.vb_vector_len)


def paper_stored(acfg, L, shape_of):
    """VB-LoRA §3.4: stored = h·b + #sub-vectors · ((k - 1) weights + k indices), an index counted in float32
    equivalents as the smallest unsigned int holding h (uint8: 1/4); for k = 2, h <= 256: h·b + 3·L·M·r·(d/b)."""
    h, b, k, r = acfg.vb_num_vectors, acfg.vb_vector_len, acfg.vb_topk, acfg.r
    n_sub = sum(L * r * (d_in + d_out) // b for d_in, d_out in (shape_of[t] for t in acfg.target_list))
    index_bytes = 1 if h <= 256 else 2 if h <= 65536 else 4
    return h * b + n_sub * ((k - 1) + k * index_bytes / 4)


# -----------------------------------------------------------------------------
# config defaults and bad input


def test_method_defaults_follow_the_papers():
    v, vb = AdapterConfig(adapter="vera"), AdapterConfig(adapter="vblora")
    assert v.r == 1024 and v.vera_d_init == 0.1 and v.target_list == list(TARGETS)   # VeRA Table 9, Table 8
    assert (vb.r, vb.vb_num_vectors, vb.vb_vector_len, vb.vb_topk) == (4, 2048, 256, 2)  # VB-LoRA §4.3
    assert AdapterConfig(adapter="lora").r == 8 and AdapterConfig(adapter="mosa").r == 32
    import argparse
    ap = adapters.add_dataclass_args(argparse.ArgumentParser(), AdapterConfig)
    ns = ap.parse_args("--adapter vblora --vb_topk 3 --vb_num_vectors 64 --vb_vector_len 128".split())
    assert adapters.dataclass_from_args(AdapterConfig, ns) == AdapterConfig(adapter="vblora", vb_topk=3, vb_num_vectors=64,
                                                                           vb_vector_len=128)
    ns = ap.parse_args("--adapter vera --vera_d_init 1e-7 --r 256".split())
    assert adapters.dataclass_from_args(AdapterConfig, ns) == AdapterConfig(adapter="vera", vera_d_init=1e-7, r=256)
    assert "VeRA: d_init" in ap.format_help() and "VB-LoRA: k bank vectors" in ap.format_help()


@pytest.mark.parametrize("kw,msg", [
    (dict(adapter="vera", vera_d_init=0.0), "vera_d_init must be a finite nonzero number, got 0.0: b starts at 0"),
    (dict(adapter="vera", vera_d_init=float("nan")), "vera_d_init must be a finite nonzero number, got nan"),
    (dict(adapter="vera", vera_d_init=float("inf")), "vera_d_init must be a finite nonzero number, got inf"),
    (dict(adapter="vera", seed=-1), "seed must be in \\[0, 2\\^64\\) for vera \\(it seeds the frozen random A and B\\)"),
    (dict(adapter="vblora", vb_topk=0), "vb_topk \\(k\\) must be >= 1, got 0: pass --vb_topk 1 or more"),
    (dict(adapter="vblora", vb_num_vectors=0), "vb_num_vectors \\(h\\) must be >= 1, got 0"),
    (dict(adapter="vblora", vb_vector_len=0), "vb_vector_len \\(b\\) must be >= 1, got 0"),
    (dict(adapter="vblora", vb_num_vectors=4, vb_topk=5), "vb_topk \\(k=5\\) exceeds vb_num_vectors \\(h=4\\)"),
    (dict(adapter="vblora", vb_vector_len=32), "vblora: d_out=16 of k_proj is not a multiple of vb_vector_len b=32"),
    (dict(adapter="vblora", vb_vector_len=32, targets="q_proj,gate_proj"), "vblora: d_out=48 of gate_proj"),
    (dict(adapter="vblora", vb_vector_len=5), "vblora: d_in=32 of q_proj is not a multiple of vb_vector_len b=5")])
def test_bad_input_is_refused_with_one_line_and_leaves_the_base_untouched(kw, msg):
    model = tiny_model(L=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg) as e:
        inject(model, AdapterConfig(**kw))
    assert "\n" not in str(e.value)
    assert not hasattr(model, "adapter_config") and not any(isinstance(m, adapters.Adapter) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())   # not even frozen
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("argv,msg", [
    ("--model llama3-8b --adapter vblora --vb_vector_len 3000",
     "error: vblora: d_in=4096 of q_proj is not a multiple of vb_vector_len b=3000"),
    ("--model llama3-8b --adapter vera --vera_d_init 0", "error: vera_d_init must be a finite nonzero number, got 0.0")])
def test_cli_bad_input_prints_one_error_line(capsys, argv, msg):
    check_cli_error(capsys, argv.split(), msg)


# -----------------------------------------------------------------------------
# initialisation: VeRA is the identity at step 0, VB-LoRA is not


@pytest.mark.parametrize("name", VERA)
def test_vera_is_identity_at_init(name):
    check_identity_at_init(acfg_of(name))


@pytest.mark.parametrize("name", VERA)
def test_vera_init_and_frozen_pair_rebuilt_here_from_the_seed(name):
    """d = d_init, b = 0 (§3.3); ONE frozen pair for the whole model at the largest adapted shapes, every module
    using its top-left slice; drawn as Kaiming-uniform with gain sqrt(2), U(±sqrt(6 / fan_in)), A first then B,
    from a generator seeded with the adapter's seed alone (peft's recipe, written here independently)."""
    model = tiny_model()
    acfg = acfg_of(name, seed=11)
    params = inject(model, acfg)
    mods = adapted(model)
    d_in_max = max(m.d_in for _, m in mods)
    d_out_max = max(m.d_out for _, m in mods)
    A, B = vera_pair(model)
    g = torch.Generator().manual_seed(11)
    want_A = torch.empty(acfg.r, d_in_max).uniform_(-math.sqrt(6 / d_in_max), math.sqrt(6 / d_in_max), generator=g)
    want_B = torch.empty(d_out_max, acfg.r).uniform_(-math.sqrt(6 / acfg.r), math.sqrt(6 / acfg.r), generator=g)
    torch.testing.assert_close(A, want_A, rtol=1e-6, atol=0)
    torch.testing.assert_close(B, want_B, rtol=1e-6, atol=0)
    assert A.dtype == B.dtype == torch.float32 and not A.requires_grad and not B.requires_grad
    for n, m in mods:
        assert val(m.A) is A and val(m.B) is B                          # one pair, not one per module or shape
        assert torch.equal(m.d, torch.full((acfg.r,), acfg.vera_d_init)) and torch.equal(m.b, torch.zeros(m.d_out))
        a, b_ = m.slices()
        assert a.shape == (acfg.r, m.d_in) and b_.shape == (m.d_out, acfg.r)
        assert a.data_ptr() == A.data_ptr() and b_.data_ptr() == B.data_ptr()   # views, no copies
    assert {id(p) for p in params} == {id(p) for _, m in mods for p in (m.d, m.b)}
    assert not any(k.startswith("adapter_banks") for k in model.state_dict())    # not saved with the model
    other = tiny_model()
    inject(other, acfg_of(name, seed=12))
    assert not torch.equal(vera_pair(other)[0], A)


@pytest.mark.parametrize("name", VBLORA)
def test_vblora_is_not_identity_at_init_and_equals_the_dense_formula(name):
    """VB-LoRA composes A and B from a random bank at step 0 (no zero factor), so unlike LoRA the adapted model
    differs from the base before any training; its output is then W0 x + b + B A x with A, B rebuilt here."""
    model = tiny_model(bias=True)
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        base = model(idx)
        inject(model, acfg_of(name))
        assert not torch.allclose(model(idx), base, rtol=0, atol=1e-6)
        for n, mod in adapted(model):
            x = torch.randn(5, mod.d_in)
            ref = x @ vblora_weight(model, n, mod).T + bias_of(mod)
            torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-6)
            assert (vblora_weight(model, n, mod) - mod.weight).abs().max() > 0


def test_vblora_init_follows_the_paper():
    """Bank U(-0.02, 0.02) (§4.1), logits N(0, 0.1²) (the paper's N(0, 0.01) is (mean, variance); peft's std 0.1),
    logits_A (r, d_in/b, h), logits_B (d_out/b, r, h)."""
    model = tiny_model(L=8)
    acfg = AdapterConfig(adapter="vblora", r=4, vb_num_vectors=300, vb_vector_len=16)
    inject(model, acfg)
    bank = model.adapter_banks.all.bank["0"]
    assert bank.shape == (300, 16) and bank.abs().max() <= 0.02
    assert bank.std().item() == pytest.approx(0.02 / math.sqrt(3), rel=0.05)       # uniform's std
    logits = torch.cat([torch.cat([m.logits_A.flatten(), m.logits_B.flatten()]) for _, m in adapted(model)])
    assert logits.std().item() == pytest.approx(0.1, rel=0.02) and abs(logits.mean().item()) < 0.002
    for _, m in adapted(model):
        assert m.logits_A.shape == (4, m.d_in // 16, 300) and m.logits_B.shape == (m.d_out // 16, 4, 300)
        assert val(m.bank) is bank


# -----------------------------------------------------------------------------
# forward: the dense formulas, peft


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_dense_formula(name):
    check_forward_equals_dense(acfg_of(name, dropout=0.1), lambda model, n, mod, xt: dense_weight(model, n, mod))  # eval mode: dropout inactive


def check_matches_peft(tmp_path, arch, acfg, peft_cfg, copy_in, pairs):
    """Our adapter on a checkpoint transformers wrote, and peft's on the same checkpoint, with our (randomized)
    tensors copied into peft's: the same logits, and the same gradients for each (ours, peft's) tensor pair, under
    a random cotangent; training mode with the same RNG stream when dropout > 0 (the same masks in both)."""
    from peft import get_peft_model
    hf = make_hf_checkpoint(tmp_path / "base", arch)
    ours = load_ours(tmp_path / "base")
    inject(ours, acfg)
    randomize(ours)
    pm = get_peft_model(hf, peft_cfg)
    with torch.no_grad():
        copy_in(ours, pm)
    ours.train(acfg.dropout > 0), pm.train(acfg.dropout > 0)
    idx = torch.randint(0, 123, (2, 9))
    torch.manual_seed(5)
    logits = ours(idx)
    torch.manual_seed(5)
    ref = pm(input_ids=idx).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(logits)
    (logits * w).sum().backward()
    (ref * w).sum().backward()
    checked = 0
    for what, ours_p, peft_p in pairs(ours, pm):
        assert peft_p.grad.abs().max() > 0, what
        tol = 2e-4 * peft_p.grad.abs().max().item()  # fp32 through two model implementations: scale by the largest
        torch.testing.assert_close(ours_p.grad, peft_p.grad, rtol=1e-3, atol=tol, msg=lambda m: f"{what}: {m}")
        checked += 1
    return checked


@pytest.mark.parametrize("arch,dropout,seed", [("llama3", 0.0, 0), ("qwen2", 0.0, 7), ("llama3", 0.3, 3)])
def test_vera_matches_peft(tmp_path, arch, dropout, seed):
    """peft's VeRA built with projection_prng_key = our seed draws the SAME frozen pair bit for bit (so nothing
    frozen is copied); our d and b are copied into its vera_lambda_d / vera_lambda_b."""
    from peft import VeraConfig
    acfg = AdapterConfig(adapter="vera", r=8, dropout=dropout, seed=seed)
    cfg = VeraConfig(r=8, target_modules=list(TARGETS), projection_prng_key=seed, vera_dropout=dropout, d_initial=0.1)

    def copy_in(ours, pm):
        A, B = vera_pair(ours)
        assert torch.equal(pm.base_model.vera_A["default"], A) and torch.equal(pm.base_model.vera_B["default"], B)
        for n, mod in adapted(ours):
            pmod = pm.base_model.model.get_submodule(n)
            pmod.vera_lambda_d["default"].copy_(mod.d)
            pmod.vera_lambda_b["default"].copy_(mod.b)

    def pairs(ours, pm):
        for n, mod in adapted(ours):
            pmod = pm.base_model.model.get_submodule(n)
            yield f"{n}.d", mod.d, pmod.vera_lambda_d["default"]
            yield f"{n}.b", mod.b, pmod.vera_lambda_b["default"]
    assert check_matches_peft(tmp_path, arch, acfg, cfg, copy_in, pairs) == 2 * 7 * 3


@pytest.mark.parametrize("arch,b,k,dropout", [("llama3", 16, 2, 0.0), ("qwen2", 32, 3, 0.0), ("llama3", 16, 2, 0.3)])
def test_vblora_matches_peft(tmp_path, arch, b, k, dropout):
    """Our bank and logits copied into peft's VB-LoRA (the same logits layout): the same output, and the same
    gradients for the one shared bank and every module's logits_A, logits_B."""
    from peft import VBLoRAConfig
    acfg = AdapterConfig(adapter="vblora", r=4, vb_num_vectors=10, vb_vector_len=b, vb_topk=k, dropout=dropout)
    cfg = VBLoRAConfig(r=4, num_vectors=10, vector_length=b, topk=k, target_modules=list(TARGETS),
                       vblora_dropout=dropout)

    def copy_in(ours, pm):
        pm.base_model.vblora_vector_bank["default"].copy_(ours.adapter_banks.all.bank["0"])
        for n, mod in adapted(ours):
            pmod = pm.base_model.model.get_submodule(n)
            pmod.vblora_logits_A["default"].copy_(mod.logits_A)
            pmod.vblora_logits_B["default"].copy_(mod.logits_B)

    def pairs(ours, pm):
        yield "bank", ours.adapter_banks.all.bank["0"], pm.base_model.vblora_vector_bank["default"]
        for n, mod in adapted(ours):
            pmod = pm.base_model.model.get_submodule(n)
            yield f"{n}.logits_A", mod.logits_A, pmod.vblora_logits_A["default"]
            yield f"{n}.logits_B", mod.logits_B, pmod.vblora_logits_B["default"]
    assert check_matches_peft(tmp_path, arch, acfg, cfg, copy_in, pairs) == 1 + 2 * 7 * 3


# -----------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("L,hidden,inter", [(5, 32, 48), (4, 48, 40), (7, 16, 64)])
@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_formula(L, hidden, inter, name):
    """Meta-device model: the report per type equals spec_count, VB-LoRA's bank h·b is counted once (under
    the by_type row "all", in the total), the stored count is the paper's §3.4, VeRA's frozen pair is reported, not counted."""
    kw = dict(targets="q_proj,k_proj,o_proj,down_proj")
    if name in VBLORA:
        kw["vb_vector_len"] = 8  # divides every dimension of the three shapes
    acfg = acfg_of(name, **kw)
    cfg, base, rep = meta_report(acfg, L, hidden, inter)
    want = {t: spec_count(acfg, L, *shapes(cfg)[t]) for t in acfg.target_list}
    bank = acfg.vb_num_vectors * acfg.vb_vector_len if acfg.adapter == "vblora" else 0
    rows = {**want, "all": bank} if bank else want
    assert {t: e["trainable"] for t, e in rep["by_type"].items()} == rows and rep["base"] == base
    assert rep["trainable"] == sum(want.values()) + bank
    assert rep["percent"] == pytest.approx(100 * rep["trainable"] / (base + rep["trainable"]))
    if acfg.adapter == "vblora":
        assert rep["by_type"]["all"]["trainable"] == bank == rep["vblora"]["bank"]
        assert rep["vblora"]["stored"]["params"] == pytest.approx(paper_stored(acfg, L, shapes(cfg)))
    else:
        assert "all" not in rep["by_type"]
        d_in_max = max(shapes(cfg)[t][0] for t in acfg.target_list)
        d_out_max = max(shapes(cfg)[t][1] for t in acfg.target_list)
        assert rep["vera"]["A"] == [acfg.r, d_in_max] and rep["vera"]["B"] == [d_out_max, acfg.r]
        assert rep["vera"]["frozen"] == acfg.r * (d_in_max + d_out_max)


def test_vblora_stored_count_reproduces_the_paper_formula_and_table():
    """§3.4: for k = 2 and h <= 256 (uint8 indices) stored = h·b + 3·L·M·r·(d/b); Table 1's "VB-LoRA all" on
    RoBERTa-large (L = 24, d = 1024, FFN 4096; q, k, v, o, up, down; h = 90, b = 256, r = 4) lists 0.033M."""
    cfg = ModelConfig(vocab_size=50265, hidden_size=1024, intermediate_size=4096, n_layers=24, n_heads=16,
                      n_kv_heads=16, head_dim=64)
    with torch.device("meta"):
        model = Transformer(cfg)
    acfg = AdapterConfig(adapter="vblora", r=4, vb_num_vectors=90, vb_vector_len=256,
                         targets="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj")
    inject(model, acfg)
    stored = param_report(model)["vblora"]["stored"]["params"]
    d_over_b = {t: (d_in + d_out) / 256 for t, (d_in, d_out) in shapes(cfg).items()}
    assert stored == 90 * 256 + 3 / 2 * 24 * 4 * sum(d_over_b[t] for t in acfg.target_list)
    assert round(stored / 1e6, 3) == 0.033


@pytest.mark.parametrize("adapter", ["vera", "vblora"])
def test_cli_param_report_llama3_8b(capsys, adapter):
    """The command line on the llama3-8b preset with the default hyperparameters: the formulas per type, the
    reference base count, VeRA's frozen pair (1024 x 14336 both ways), VB-LoRA's bank and stored count."""
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, "--json"])
    rep = json.loads(capsys.readouterr().out)
    acfg = AdapterConfig(**rep["adapter"])
    cfg = ModelConfig.from_hf_dict(adapters.PRESETS["llama3-8b"])
    want = {t: spec_count(acfg, 32, *shapes(cfg)[t]) for t in TARGETS}
    rows = {**want, "all": 2048 * 256} if adapter == "vblora" else want  # VB-LoRA's bank: the row "all"
    assert {t: e["trainable"] for t, e in rep["by_type"].items()} == rows and rep["base"] == 8_030_261_248
    if adapter == "vera":
        assert acfg.r == 1024 and rep["trainable"] == sum(want.values()) == 32 * (7 * 1024 + 43008)
        assert rep["vera"]["A"] == [1024, 14336] and rep["vera"]["B"] == [14336, 1024]
    else:
        assert rep["trainable"] == sum(want.values()) + 2048 * 256
        assert rep["vblora"]["stored"]["params"] == paper_stored(acfg, 32, shapes(cfg))
    adapters.main(["--model", "llama3-8b", "--adapter", adapter])  # the readable table
    out = capsys.readouterr().out
    assert f"trainable {rep['trainable']:,} | base 8,030,261,248" in out
    assert ("VeRA frozen random A 1024x14336" in out) == (adapter == "vera")
    assert ("VB-LoRA trainable = bank 524,288" in out) == (adapter == "vblora")


# -----------------------------------------------------------------------------
# gradients, the bank owned once


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_trainable_tensor_and_nothing_frozen(name):
    """DDP-readiness (find_unused_parameters=False): every trainable tensor gets a gradient; the base and VeRA's
    frozen pair get none. At step 0 VeRA's d has a zero gradient (b = 0), b a nonzero one (d = d_init)."""
    model = tiny_model()
    params = inject(model, acfg_of(name))
    loss_of(model).backward()
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(t.grad is None for _, t in model.named_buffers())
    for _, m in adapted(model):
        if isinstance(m, adapters.VeRA):
            assert not m.d.grad.any() and m.b.grad.abs().sum() > 0
        else:
            assert m.logits_A.grad.abs().sum() > 0 and m.logits_B.grad.abs().sum() > 0
            # only the k selected logits of each sub-vector's row get a gradient
            assert ((m.logits_A.grad != 0).sum(-1) <= model.adapter_config.vb_topk).all()


def test_vera_product_gradients_match_finite_differences():
    """VeRAProduct's hand-written backward (fp64 here): z = (h ⊙ d)(Λ_b B)ᵀ, gradients for h, d and b."""
    g = torch.Generator().manual_seed(0)
    h, d, b = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (3,), (4,)))
    B = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(adapters.VeRAProduct.apply, (h, d, b, B))
    z = adapters.VeRAProduct.apply(h, d, b, B)
    torch.testing.assert_close(z, h @ torch.diag(d) @ B.T @ torch.diag(b))


def test_vera_keeps_only_A_x_for_backward():
    """Per module, VeRA saves one activation for backward, A x̃ (n, r): neither Λ_b B (d_out, r) nor a second (n, r)
    nor peft's (n, d_out) product. Tensors sharing storage with a parameter or buffer (W0, the frozen pair, d, b)
    are references, not activations."""
    model = tiny_model()
    inject(model, acfg_of("vera"))
    randomize(model)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for n, mod in adapted(model):
        x = torch.randn(6, mod.d_in, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            mod(x)
        activations = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in own]
        assert activations == [(6, model.adapter_config.r)], n


def test_vblora_bank_is_owned_once_and_its_grad_is_the_sum_over_modules():
    """One bank in parameters(), state_dict() and the optimizer, used by every module of every type and layer;
    an untied copy (one private bank per module, same values) gives the same loss, and the shared bank's
    gradient equals the sum of the copies' gradients."""
    model = tiny_model(L=3)
    params = inject(model, acfg_of("vblora"))
    randomize(model)
    bank = model.adapter_banks.all.bank["0"]
    assert sum(p is bank for p in params) == 1 and sum(p is bank for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "bank" in k] == ["adapter_banks.all.bank.0"]
    opt = torch.optim.AdamW(params)
    assert sum(p is bank for g in opt.param_groups for p in g["params"]) == 1
    assert len(adapted(model)) == 21 and all(val(m.bank) is bank for _, m in adapted(model))
    untied = copy.deepcopy(model)
    for _, m in adapted(untied):
        m.bank = nn.Parameter(val(m.bank).detach().clone())
    del untied.adapter_banks
    lt, lu = loss_of(model), loss_of(untied)
    torch.testing.assert_close(lt, lu)
    lt.backward(), lu.backward()
    per_module = [m.bank.grad for _, m in adapted(untied)]
    assert sum(g.abs().sum() > 0 for g in per_module) > 1
    torch.testing.assert_close(bank.grad, sum(per_module), rtol=1e-5, atol=1e-8)


# -----------------------------------------------------------------------------
# merge, save/load, export, dtypes, compile


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_equals_dense_formula_and_unmerged_and_unmerge_restores_w0(name):
    check_merge_unmerge(acfg_of(name), want_weight=dense_weight)


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip_is_exact(tmp_path, name):
    base, meta = check_save_load_round_trip(acfg_of(name, seed=3), tmp_path / "ad")
    saved = set(load_file(str(tmp_path / "ad" / "adapter.safetensors")))
    assert saved == set(adapters.adapter_params(base))
    if name in VERA:  # the frozen pair is not in the file: seed and checksum in adapter.json
        assert saved == {f"{n}.{v}" for n, _ in adapted(base) for v in ("d", "b")}
        p = meta["vera_projection"]
        A, B = vera_pair(base)
        assert p["seed"] == 3 and p["A"] == list(A.shape) and p["B"] == list(B.shape)
        assert p["checksum"] == adapters.checksum("vera-projections-v1", A, B)
    else:  # the bank once, every module's logits (full logits: training can resume; the paper stores top-k only)
        assert "adapter_banks.all.bank.0" in saved and len(saved) == 1 + 2 * len(adapted(base))


def test_vera_load_refuses_another_projection_checksum(tmp_path):
    model = tiny_model()
    inject(model, acfg_of("vera"))
    save_adapter(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter.json"
    meta = json.loads(f.read_text())
    meta["vera_projection"]["checksum"] = "0" * 16
    f.write_text(json.dumps(meta))
    fresh = tiny_model()
    with pytest.raises(ValueError, match="VeRA projections A \\[8, 48\\], B \\[48, 8\\] rebuilt from seed 0 have "
                                         "checksum .* says 0000000000000000: this torch draws other") as e:
        load_adapter(fresh, tmp_path / "ad")
    assert "\n" not in str(e.value)
    assert not hasattr(fresh, "adapter_config") and not any(isinstance(m, adapters.Adapter) for m in fresh.modules())


def test_vera_fresh_process_rebuilds_the_pair_from_the_saved_seed(tmp_path):
    """A new interpreter (one thread) loads the adapter: the pair it draws from the seed in adapter.json has the
    saved checksum, and its logits equal ours."""
    saved, theirs, their_logits, ours = reload_in_fresh_process(tiny_model(L=3, bias=True), acfg_of("vera_r3_d1", seed=2**63 + 5), tmp_path,
                                                                "_vera_projection")
    assert theirs == saved["vera_projection"]
    torch.testing.assert_close(their_logits, ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,arch", [("vera", "llama3"), ("vblora", "qwen2")])
def test_export_merged_round_trip(tmp_path, name, arch):
    check_export_merged_round_trip(tmp_path, arch, acfg_of(name))  # tiny HF: hidden 64, kv 32, FFN 96: b = 8 divides all


@pytest.mark.parametrize("name", ["vera", "vblora"])
def test_adapter_tensors_fp32_on_bf16_base(name):
    model = tiny_model().to(torch.bfloat16)
    params = inject(model, acfg_of(name))
    randomize(model)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(t.dtype == torch.float32 for n, t in model.named_buffers() if n.startswith("adapter_banks"))
    n, mod = adapted(model)[0]
    x = torch.randn(3, mod.d_in, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        ref = x.float() @ (dense_weight(model, n, mod).float()).T
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params if p.grad is not None)


@pytest.mark.parametrize("name", ["vera", "vblora"])
def test_bf16_autocast_matches_fp32_and_keeps_fp32_gradients(name):
    """Under CPU bf16 autocast (the mixed-precision paths of VeRAProduct and add_lowrank_): the loss and every
    adapter gradient stay within bf16 error of the fp32 run, and the gradients are fp32."""
    model = tiny_model()
    inject(model, acfg_of(name))
    randomize(model)
    twin = copy.deepcopy(model)
    ref = loss_of(model)
    ref.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(twin)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    P, T = adapters.adapter_params(model), adapters.adapter_params(twin)
    for n in P:
        assert T[n].grad.dtype == torch.float32
        if P[n].grad.abs().sum() > 0:
            assert (T[n].grad - P[n].grad).norm() <= 0.05 * P[n].grad.norm(), n


class WithShared(nn.Module):
    """One adapted layer plus the shared Parameters it reads (VB-LoRA's bank; VeRA's frozen buffers are not
    parameters), so check_compiled compares the bank's gradient too."""

    def __init__(self, mod):
        super().__init__()
        self.mod = mod
        self.shared = nn.ParameterList([h() for h in vars(mod).values()
                                        if isinstance(h, adapters.Shared) and isinstance(h(), nn.Parameter)])

    def forward(self, x):
        return self.mod(x)


@pytest.mark.parametrize("name", VARIANTS)
def test_compiles_and_equals_eager(name):
    """torch.compile(fullgraph=True, aot_eager) of one adapted layer in training mode: eager's output and the
    gradients of x, of the layer's own tensors and of the shared bank."""
    model = tiny_model(L=2, bias=True)
    inject(model, acfg_of(name))
    randomize(model)
    n, mod = adapted(model)[0]
    layer = WithShared(mod).train()
    assert len(layer.shared) == (1 if name in VBLORA else 0)
    x = torch.randn(2, 5, mod.d_in, requires_grad=True)
    assert kernels.check_compiled(layer, x, backend="aot_eager", rtol=1e-5, atol=1e-5) >= 1
