"""Tests of CoLA, MultiLoRA and BSLoRA (adapters.py) against references rebuilt here: their dense formulas
from the named tensors (CoLA's double sum over every (A_i, B_j) pair, MultiLoRA's Σ_i diag(λ_i) B_i A_i,
BSLoRA's centred slices / Kronecker blocks cut by hand), an fp64 SVD of W0 (CoLA's init), parameter counts
written out per module type (and BSLoRA's count in its authors' table), an untied per-module copy of BSLoRA's
shared LoRAs, transformers (export_merged), a fresh process (CoLA's residual rebuilt from the plain base).
Tiny shapes; run:
    python -m pytest -q test_multi_lora.py
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import adapters
import kernels
from adapters import AdapterConfig, inject, load_adapter, merge, param_report, save_adapter, val
from model import ModelConfig, Transformer
from test_adapters import (adapted, reload_in_fresh_process, check_backward_reaches_every_trainable_tensor,
                           check_cli_error, check_dropout_on_adapter_input, check_export_merged_round_trip,
                           check_ddp_trains, check_forward_equals_dense, check_identity_at_init,
                           check_merge_unmerge, check_save_load_round_trip, layer_of, loss_of, randomize,
                           shapes, tiny_cfg, tiny_model)
from test_sharing import WithShared

HERE = Path(__file__).parent

# tiny model: hidden 32, q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48, L = 5: BSLoRA's shared LoRAs are
# 48 wide on both sides (slice), so q, k, v, o cut both sides, gate/up their input side, down its output side
VARIANTS = {
    "cola": dict(adapter="cola", r=4, alpha=8.0),                                   # svd init, M = 2, N = 3
    "cola_lora_init": dict(adapter="cola", r=4, alpha=8.0, cola_init="lora", num_a=3, num_b=2),
    "multilora": dict(adapter="multilora", r=4, alpha=8.0),                         # n = 3
    "multilora_n2": dict(adapter="multilora", r=2, num_a=2),
    "bslora": dict(adapter="bslora"),                                               # slice, ranks 2, 4, 8
    "bslora_kron": dict(adapter="bslora", bs_share="kron", bs_kron_size=16),        # 16 divides 16, 32, 48
    "bslora_no_local": dict(adapter="bslora", bs_r_local=0, bs_r_intra=3, bs_r_inter=0, alpha=4.0),
}
IDENTITY = [n for n in VARIANTS if n != "cola"]  # CoLA's svd init is not bit-identity (its own tests below)
BSLORA = [n for n in VARIANTS if n.startswith("bslora")]


def acfg_of(name, **kw):
    return AdapterConfig(**{**VARIANTS[name], **kw})


def largest(model):
    """(D_in, D_out): the largest d_in and d_out among the adapted module types, from the model config."""
    sh = shapes(model.config)
    types = model.adapter_config.target_list
    return max(sh[t][0] for t in types), max(sh[t][1] for t in types)


def dense_weight(model, name, mod):
    """W + ΔW of module `name` (W: the frozen weight it holds, CoLA svd's residual), fp32, from the named tensors:
      cola:      s Σ_i Σ_j B_j A_i, every pair
      multilora: s Σ_i diag(λ_i) B_i A_i
      bslora:    s (B A + T(B_intra^(l), A_intra^(l)) + T(B_inter, A_inter)), T = centred slice, or Kronecker
                 blocks [σ_A[0, j] A_sh]_j, [σ_B[i, 0] B_sh]_i built block by block."""
    P, acfg = dict(model.named_parameters()), model.adapter_config
    s, W, d_in, d_out = acfg.scaling, mod.weight, mod.d_in, mod.d_out
    own = lambda n: P[f"{name}.{n}"]
    if acfg.adapter == "cola":
        A, B = own("A"), own("B")
        assert A.shape == (acfg.num_a, acfg.r, d_in) and B.shape == (acfg.num_b, d_out, acfg.r)
        return W + s * sum(B[j] @ A[i] for i in range(acfg.num_a) for j in range(acfg.num_b))
    if acfg.adapter == "multilora":
        A, B, lam = own("A"), own("B"), own("lam")
        assert lam.shape == (acfg.num_a, d_out)
        return W + s * sum(torch.diag(lam[i]) @ B[i] @ A[i] for i in range(acfg.num_a))
    assert acfg.adapter == "bslora"
    dW = own("B") @ own("A") if acfg.bs_r_local else torch.zeros(d_out, d_in)
    D_in, D_out = largest(model)
    for part, group, r in (("intra", layer_of(name), acfg.bs_r_intra), ("inter", 0, acfg.bs_r_inter)):
        if not r:
            assert f"adapter_banks.all.A_{part}.{group}" not in P
            continue
        A, B = P[f"adapter_banks.all.A_{part}.{group}"], P[f"adapter_banks.all.B_{part}.{group}"]
        if acfg.bs_share == "slice":
            assert A.shape == (r, D_in) and B.shape == (D_out, r)
            i0, o0 = (D_in - d_in) // 2, (D_out - d_out) // 2
            A, B = A[:, i0:i0 + d_in], B[o0:o0 + d_out]
        else:
            K = acfg.bs_kron_size
            sA, sB = own(f"sA_{part}"), own(f"sB_{part}")
            assert A.shape == (r, K) and B.shape == (K, r) and sA.shape == (1, d_in // K) and sB.shape == (d_out // K, 1)
            A = torch.cat([sA[0, j] * A for j in range(d_in // K)], dim=1)   # (r, d_in)
            B = torch.cat([sB[i, 0] * B for i in range(d_out // K)], dim=0)  # (d_out, r)
        dW = dW + B @ A
    return W + s * dW


# -----------------------------------------------------------------------------
# config defaults and bad input


def test_num_a_num_b_take_each_methods_default():
    for adapter, na, nb in (("cola", 2, 3), ("multilora", 3, 3), ("masa", 5, 1), ("hydralora", 1, 1), ("lora", 1, 1),
                            ("bslora", 1, 1)):
        acfg = AdapterConfig(adapter=adapter)
        assert (acfg.num_a, acfg.num_b) == (na, nb), adapter
    assert AdapterConfig(adapter="multilora", num_a=5).num_b == 5  # one B per A
    assert AdapterConfig(adapter="cola", num_a=4).num_b == 3
    c = AdapterConfig(adapter="cola")
    assert c.cola_init == "svd" and c.r == 8 and c.target_list == list(adapters.TARGETS)
    b = AdapterConfig(adapter="bslora")
    assert (b.bs_r_local, b.bs_r_intra, b.bs_r_inter, b.bs_share, b.bs_kron_size) == (2, 4, 8, "slice", 256)
    assert b.scaling == 2.0  # the authors' code fixes s = 2: alpha / r with the defaults 16 / 8
    import argparse
    ap = adapters.add_dataclass_args(argparse.ArgumentParser(), AdapterConfig)
    for argv, want in ((["--adapter", "cola"], c), (["--adapter", "multilora", "--num_a", "4"],
                                                     AdapterConfig(adapter="multilora", num_a=4, num_b=4)),
                       (["--adapter", "bslora", "--bs_share", "kron"], AdapterConfig(adapter="bslora", bs_share="kron"))):
        assert adapters.dataclass_from_args(AdapterConfig, ap.parse_args(argv)) == want


@pytest.mark.parametrize("kw,msg", [
    (dict(adapter="cola", cola_init="pissa"), "unknown cola_init 'pissa': choose svd"),
    (dict(adapter="cola", num_a=0), "num_a \\(N\\) must be >= 1"),
    (dict(adapter="cola", num_b=0), "num_b \\(n_B\\) must be >= 1"),
    (dict(adapter="cola", r=17, targets="k_proj"), "cola: r=17 exceeds the rank of k_proj \\(16x32\\).*--cola_init lora"),
    (dict(adapter="multilora", num_a=3, num_b=2), "num_b must equal num_a for multilora .* pass only --num_a"),
    (dict(adapter="bslora", bs_r_local=-1), "bs_r_local, bs_r_intra, bs_r_inter must be >= 0 with a positive sum"),
    (dict(adapter="bslora", bs_r_local=0, bs_r_intra=0, bs_r_inter=0), "must be >= 0 with a positive sum, got \\(0, 0, 0\\)"),
    (dict(adapter="bslora", bs_share="gate"), "unknown bs_share 'gate': choose slice or kron"),
    (dict(adapter="bslora", bs_share="kron", bs_kron_size=0), "bs_kron_size \\(K\\) must be >= 1"),
    (dict(adapter="bslora", bs_share="kron", bs_kron_size=32), "bslora kron: bs_kron_size K=32 does not divide "
                                                               "k_proj's shape 16x32")])
def test_bad_config_is_refused_with_one_line(kw, msg):
    model = tiny_model(L=2)
    with pytest.raises(ValueError, match=msg) as e:
        inject(model, AdapterConfig(**kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,msg", [
    ("--adapter multilora --num_a 2 --num_b 3", "error: num_b must equal num_a for multilora"),
    ("--adapter bslora --bs_share kron --bs_kron_size 3000", "error: bslora kron: bs_kron_size K=3000 does not divide"),
    ("--adapter cola --cola_init kaiming", "error: unknown cola_init 'kaiming'")])
def test_cli_bad_input_prints_one_error_line(capsys, argv, msg):
    check_cli_error(capsys, ["--model", "llama3-8b", *argv.split()], msg)


# -----------------------------------------------------------------------------
# initialisation: identity, CoLA's SVD split, MultiLoRA's Kaiming B


@pytest.mark.parametrize("name", IDENTITY)
def test_is_identity_at_init(name):
    check_identity_at_init(acfg_of(name))


def test_cola_svd_init_is_not_identity_but_the_base_up_to_fp32_rounding():
    """The base weight is REPLACED by the residual: the adapted model differs from the base (not bit for bit),
    but only by fp32 rounding; residual + s ΣΣ B_j A_i == W0 (dense); the adapter holds the top-r singular part
    of W0 (an fp64 SVD here) and the residual the rest; the M A's are equal, and so are the N B's."""
    base = tiny_model(bias=True)
    model = copy.deepcopy(base)
    acfg = acfg_of("cola")
    r, s = acfg.r, acfg.scaling
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        ref = base(idx)
        inject(model, acfg)
        out = model(idx)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    W0s = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    for n, mod in adapted(model):
        W0, Wres = W0s[n].double(), mod.weight.detach().double()
        assert not torch.equal(mod.weight, W0s[n]) and mod.weight is not W0s[n]
        tol = 1e-5 * W0.abs().max().item()
        with torch.no_grad():
            dW = dense_weight(model, n, mod).double() - Wres
        torch.testing.assert_close(Wres + dW, W0, rtol=0, atol=tol)                       # W_res + ΔW = W0
        # fp32 vs fp64 SVD: the top-r subspace moves by ~eps·|W0| / (gap at r), so a looser tolerance here
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        torch.testing.assert_close(dW, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=0, atol=10 * tol)  # top-r part
        tail = torch.cat([S[r:], torch.zeros(r, dtype=S.dtype)])
        torch.testing.assert_close(torch.linalg.svdvals(Wres), tail, rtol=0, atol=10 * tol)      # the rest
        A, B = mod.A.detach(), mod.B.detach()
        assert all(torch.equal(A[i], A[0]) for i in range(acfg.num_a))
        assert all(torch.equal(B[j], B[0]) for j in range(acfg.num_b))
        # each A_i carries 1/M and each B_j 1/N of sqrt(S_r / s): row norms of A_i are sqrt(S_r / s) / M
        torch.testing.assert_close(A[0].double().norm(dim=1), (S[:r] / s).sqrt() / acfg.num_a, rtol=1e-4, atol=0)
        torch.testing.assert_close(B[0].double().norm(dim=0), (S[:r] / s).sqrt() / acfg.num_b, rtol=1e-4, atol=0)


def test_cola_svd_on_bf16_base_rounds_the_residual_once_and_keeps_a_b_fp32():
    base = tiny_model().to(torch.bfloat16)
    model = copy.deepcopy(base)
    params = inject(model, acfg_of("cola"))
    assert params and all(p.dtype == torch.float32 for p in params)
    W0s = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    for n, mod in adapted(model):
        assert mod.weight.dtype == torch.bfloat16
        want = W0s[n].float() - mod.s * mod.B.detach().sum(0) @ mod.A.detach().sum(0)  # fp32 W_res
        torch.testing.assert_close(mod.weight.float(), want, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding
        x = torch.randn(3, mod.d_in, dtype=torch.bfloat16)
        y = mod(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), x.float() @ W0s[n].float().T, rtol=3e-2, atol=3e-2)


def test_cola_lora_init_and_multilora_init():
    """CoLA lora init: M independent Kaiming-uniform A_i, zero B_j, the base untouched. MultiLoRA: A_i and B_i
    both Kaiming-uniform with their own fan_in (d_in, r), λ zero."""
    model = tiny_model()
    W0 = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inject(model, acfg_of("cola_lora_init"))
    for n, mod in adapted(model):
        assert mod.weight is W0[n]
        bound = 1 / math.sqrt(mod.d_in)
        assert mod.A.abs().max() <= bound and mod.A.std() > 0.4 * bound and not mod.B.any()
        assert not torch.equal(mod.A[0], mod.A[1])
    model = tiny_model()
    acfg = acfg_of("multilora")
    inject(model, acfg)
    for n, mod in adapted(model):
        assert mod.A.shape == (3, acfg.r, mod.d_in) and mod.B.shape == (3, mod.d_out, acfg.r)
        for t, fan_in in ((mod.A, mod.d_in), (mod.B, acfg.r)):
            bound = 1 / math.sqrt(fan_in)
            assert t.abs().max() <= bound and t.std() > 0.4 * bound
        assert not mod.lam.any()


def test_multilora_first_step_trains_only_lambda():
    """λ = 0 at init: ∂L/∂A_i and ∂L/∂B_i are exactly zero at step 0 (they pass through λ_i), ∂L/∂λ_i is not."""
    model = tiny_model()
    inject(model, acfg_of("multilora"))
    loss_of(model).backward()
    for _, mod in adapted(model):
        assert not mod.A.grad.any() and not mod.B.grad.any()
        assert mod.lam.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# forward: the dense formulas, dropout


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_dense_formula(name):
    check_forward_equals_dense(acfg_of(name, dropout=0.1), lambda model, n, mod, xt: dense_weight(model, n, mod))  # eval mode: dropout inactive


@pytest.mark.parametrize("name", ["cola", "multilora", "bslora", "bslora_kron"])
def test_dropout_one_mask_on_adapter_input_only(name):
    """Training, p = 0.5: y = W x + b + ΔW dropout(x), ONE mask for every pair / part (reproduced by reseeding)."""
    model = tiny_model(bias=True)
    inject(model, acfg_of(name, dropout=0.5))
    randomize(model)
    model.train()
    for n, mod in adapted(model)[:7]:
        check_dropout_on_adapter_input(mod, lambda i, xt: dense_weight(model, n, mod))


# -----------------------------------------------------------------------------
# parameter counts


def count(acfg, L, d_in, d_out):
    """Trainable parameters of one module type, written out per method (BSLoRA: the local part and, with kron,
    the per-module Kronecker factors; its shared LoRAs are counted once in shared_count)."""
    r = acfg.r
    if acfg.adapter == "cola":
        return L * (acfg.num_a * r * d_in + acfg.num_b * r * d_out)
    if acfg.adapter == "multilora":
        return L * acfg.num_a * (r * d_in + r * d_out + d_out)
    assert acfg.adapter == "bslora"
    n = L * acfg.bs_r_local * (d_in + d_out)
    if acfg.bs_share == "kron":
        K = acfg.bs_kron_size
        n += L * ((acfg.bs_r_intra > 0) + (acfg.bs_r_inter > 0)) * (d_in // K + d_out // K)
    return n


def shared_count(acfg, L, D_in, D_out):
    """BSLoRA's shared LoRAs: L intra-layer pairs of rank r_intra and one inter-layer pair of rank r_inter,
    each A (r, D_in), B (D_out, r) with slice, A (r, K), B (K, r) with kron."""
    if acfg.bs_share == "kron":
        D_in = D_out = acfg.bs_kron_size
    return (L * acfg.bs_r_intra + acfg.bs_r_inter) * (D_in + D_out)


def check_counts(rep, acfg, cfg):
    sh = shapes(cfg)
    L = cfg.n_layers
    want = {t: count(acfg, L, *sh[t]) for t in acfg.target_list}
    if acfg.adapter == "bslora":
        want["all"] = shared_count(acfg, L, max(sh[t][0] for t in acfg.target_list),
                                   max(sh[t][1] for t in acfg.target_list))
    assert {t: e["trainable"] for t, e in rep["by_type"].items()} == want
    assert rep["trainable"] == sum(want.values())
    return want


@pytest.mark.parametrize("L,hidden,inter", [(5, 32, 48), (4, 48, 40), (7, 16, 64)])
@pytest.mark.parametrize("name", ["cola", "cola_lora_init", "multilora", "multilora_n2", "bslora", "bslora_no_local"])
def test_param_count_matches_formula(L, hidden, inter, name):
    cfg = tiny_cfg(L, hidden=hidden, inter=inter)
    with torch.device("meta"):
        model = Transformer(cfg)
    base = sum(p.numel() for p in model.parameters())
    acfg = acfg_of(name, targets="q_proj,k_proj,o_proj,down_proj")
    inject(model, acfg)
    rep = param_report(model)
    want = check_counts(rep, acfg, cfg)
    assert rep["base"] == base
    assert rep["percent"] == pytest.approx(100 * sum(want.values()) / (base + sum(want.values())))


def test_bslora_kron_param_count_matches_formula():
    cfg = tiny_cfg(3, hidden=32, inter=64)  # q/o 32, k/v 16, gate/up/down 64: K = 8 divides all
    with torch.device("meta"):
        model = Transformer(cfg)
    acfg = AdapterConfig(adapter="bslora", bs_share="kron", bs_kron_size=8, bs_r_local=1, bs_r_intra=2, bs_r_inter=3)
    inject(model, acfg)
    check_counts(param_report(model), acfg, cfg)


def test_bslora_slice_count_is_the_authors_published_count():
    """The authors' README table (yuhua-zhou/BSLoRA, "ShareLoRA vs BSLoRA with similar trainable parameters"):
    BSLoRA (SS) with ranks 2, 4, 16 on Llama-3-8B's q, k, v, up, down has 7,667,712 trainable parameters, and
    (SS) 2, 1, 2 has 4,513,792: our slice layout (shared LoRAs as wide as the widest adapted module) gives both."""
    for ranks, published in (((2, 4, 16), 7_667_712), ((2, 1, 2), 4_513_792)):
        model = adapters.meta_model("llama3-8b")
        inject(model, AdapterConfig(adapter="bslora", targets="q_proj,k_proj,v_proj,up_proj,down_proj",
                                    **dict(zip(("bs_r_local", "bs_r_intra", "bs_r_inter"), ranks))))
        assert param_report(model)["trainable"] == published


@pytest.mark.parametrize("adapter,extra", [("cola", []), ("cola", ["--num_a", "3", "--num_b", "1", "--cola_init", "lora"]),
                                           ("multilora", []), ("multilora", ["--num_a", "5", "--r", "4"]),
                                           ("bslora", []), ("bslora", ["--bs_share", "kron"])])
def test_cli_param_report_llama3_8b(capsys, adapter, extra):
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, *extra, "--json"])
    rep = json.loads(capsys.readouterr().out)
    acfg = AdapterConfig(**rep["adapter"])
    cfg = ModelConfig.from_hf_dict(adapters.PRESETS["llama3-8b"])
    want = check_counts(rep, acfg, cfg)
    assert rep["base"] == 8_030_261_248
    assert ("cola" in rep) == (adapter == "cola" and acfg.cola_init == "svd")
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, *extra])  # the readable table
    out = capsys.readouterr().out
    assert f"trainable {sum(want.values()):,} | base 8,030,261,248" in out
    assert ("CoLA: cola_init=svd replaced each adapted W0" in out) == ("cola" in rep)
    if adapter == "bslora":
        assert [ln for ln in out.splitlines() if ln.startswith("all ")][0].split()[-1] == f"{want['all']:,}"


# -----------------------------------------------------------------------------
# gradients: CoLA's equal experts, BSLoRA's shared LoRAs, DDP


@pytest.mark.parametrize("name", ["cola", "cola_lora_init"])
def test_cola_every_a_and_every_b_get_the_same_grad(name):
    """∂L/∂A_i = s (Σ_j B_j)ᵀ G x̃ᵀ for every i, ∂L/∂B_j = s G ((Σ_i A_i) x̃)ᵀ for every j (random tensors)."""
    model = tiny_model()
    acfg = acfg_of(name)
    inject(model, acfg)
    randomize(model)
    loss_of(model).backward()
    for _, mod in adapted(model):
        assert mod.A.grad.abs().sum() > 0 and mod.B.grad.abs().sum() > 0
        assert all(torch.equal(mod.A.grad[i], mod.A.grad[0]) for i in range(acfg.num_a))
        assert all(torch.equal(mod.B.grad[j], mod.B.grad[0]) for j in range(acfg.num_b))


@pytest.mark.parametrize("name", ["cola", "cola_lora_init"])
def test_cola_equal_starts_stay_equal_under_adamw(name):
    """svd init: the A_i start equal and so do the B_j, so after AdamW steps they still are (fully collaborative
    CoLA from the SVD init is one LoRA pair, with M and N scaling its updates); lora init: the B_j (zero) stay
    equal, the A_i (independent draws) do not."""
    model = tiny_model()
    acfg = acfg_of(name)
    params = inject(model, acfg)
    start = {n: m.B.detach().clone() for n, m in adapted(model)}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
    for n, mod in adapted(model):
        assert not torch.equal(mod.B, start[n])
        assert all(torch.equal(mod.B[j], mod.B[0]) for j in range(acfg.num_b))
        assert all(torch.equal(mod.A[i], mod.A[0]) for i in range(acfg.num_a)) == (name == "cola")


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_trainable_tensor(name):
    check_backward_reaches_every_trainable_tensor(acfg_of(name))


@pytest.mark.parametrize("name", ["bslora", "bslora_kron"])
def test_bslora_shared_grad_is_sum_of_per_module_grads(name):
    """Untied reference: every module gets private copies (same values) of the intra- and inter-layer LoRAs it
    uses; a shared tensor's gradient must equal the sum of its users' copies' gradients (intra: the modules of
    its layer, inter: every module), and every per-module tensor's gradient must match."""
    L = 3
    tied = tiny_model(L)
    inject(tied, acfg_of(name))
    randomize(tied)
    untied = copy.deepcopy(tied)
    for _, mod in adapted(untied):
        for key in ("A_intra", "B_intra", "A_inter", "B_inter"):
            setattr(mod, key, nn.Parameter(val(getattr(mod, key)).detach().clone()))
    del untied.adapter_banks
    lt, lu = loss_of(tied), loss_of(untied)
    torch.testing.assert_close(lt, lu)
    lt.backward(), lu.backward()
    P, U = dict(tied.named_parameters()), dict(untied.named_parameters())
    shared = [n for n in adapters.adapter_params(tied) if n.startswith("adapter_banks.")]
    assert sorted(shared) == sorted([f"adapter_banks.all.{s}_intra.{l}" for s in "AB" for l in range(L)] +
                                    [f"adapter_banks.all.{s}_inter.0" for s in "AB"])
    for sn in shared:
        _, _, key, g = sn.split(".")
        users = [U[f"{n}.{key}"].grad for n, _ in adapted(untied) if key.endswith("inter") or layer_of(n) == int(g)]
        assert len(users) == (7 * L if key.endswith("inter") else 7) and all(u.abs().sum() > 0 for u in users)
        torch.testing.assert_close(P[sn].grad, sum(users), rtol=1e-5, atol=1e-7)
    for n in adapters.adapter_params(tied):
        if not n.startswith("adapter_banks."):
            torch.testing.assert_close(P[n].grad, U[n].grad, rtol=1e-5, atol=1e-7)


def test_bslora_shared_loras_are_owned_once():
    """Once in parameters(), state_dict(), the optimizer; every module of layer l uses that layer's intra pair,
    every module the one inter pair."""
    model = tiny_model(L=4)
    params = inject(model, acfg_of("bslora"))
    intra, inter = model.adapter_banks.all.A_intra["2"], model.adapter_banks.all.A_inter["0"]
    for t in (intra, inter):
        assert sum(p is t for p in params) == 1 and sum(p is t for p in model.parameters()) == 1
    assert sorted(k for k in model.state_dict() if "_inter" in k) == ["adapter_banks.all.A_inter.0",
                                                                       "adapter_banks.all.B_inter.0"]
    opt = torch.optim.AdamW(params)
    assert sum(p is intra for g in opt.param_groups for p in g["params"]) == 1
    assert len(params) == len({id(p) for p in params})
    for n, mod in adapted(model):
        assert (val(mod.A_intra) is intra) == (layer_of(n) == 2)
        assert val(mod.A_inter) is inter


def test_ddp_trains_every_tensor():
    """MultiLoRA's A, B move at step 1 through weight decay; the shared BSLoRA banks are reduced once."""
    check_ddp_trains({n: acfg_of(n) for n in ("cola", "multilora", "bslora", "bslora_kron")})


@pytest.mark.parametrize("name", ["cola", "multilora", "bslora", "bslora_kron"])
def test_compiles_and_equals_eager(name):
    """torch.compile(fullgraph=True, aot_eager) of one adapted layer (training, dropout off): eager's output and
    the gradients of x, of the layer's own tensors and of the shared ones it uses."""
    model = tiny_model(L=2, bias=True)
    inject(model, acfg_of(name))
    randomize(model)
    n, mod = adapted(model)[1]  # k_proj: a strict slice of BSLoRA's shared LoRAs
    layer = WithShared(mod).train()
    x = torch.randn(2, 5, mod.d_in, requires_grad=True)
    assert kernels.check_compiled(layer, x, backend="aot_eager", rtol=1e-5, atol=1e-5) >= 1


# -----------------------------------------------------------------------------
# merge, export, save/load


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_equals_dense_formula_and_unmerged_and_unmerge_restores_w(name):
    # CoLA svd: merged = W_res + ΔW (≈ W0 at init), unmerge restores W_res bit for bit
    check_merge_unmerge(acfg_of(name), want_weight=dense_weight)


@pytest.mark.parametrize("name,arch", [("cola", "llama3"), ("multilora", "qwen2"), ("bslora", "llama3"),
                                       ("bslora_kron", "qwen2")])
def test_export_merged_round_trip(tmp_path, name, arch):
    """transformers loads the merged checkpoint (CoLA svd: W_res + ΔW) and gives our unmerged logits
    (tiny HF: hidden 64, d_ff 96, kv 32: K = 16 divides all)."""
    check_export_merged_round_trip(tmp_path, arch, acfg_of(name))


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip_is_exact(tmp_path, name):
    """load_adapter into a fresh PLAIN base (CoLA svd: it rebuilds the same residual from it, checksums agree)."""
    base, meta = check_save_load_round_trip(acfg_of(name, seed=3), tmp_path / "ad")
    if name == "cola":  # the plain W0's checksums, not the residuals'
        assert meta["cola_bases"] == {n: m.base_checksum for n, m in adapted(base)}
        assert all(meta["cola_bases"][n] != adapters.weight_checksum(m.weight) for n, m in adapted(base))
        assert len(meta["cola_bases"]) == 7 * base.config.n_layers
    else:
        assert "cola_bases" not in meta


def test_cola_checksums_follow_the_residual_not_the_merge(tmp_path):
    model = tiny_model()
    inject(model, acfg_of("cola"))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    merge(model)
    save_adapter(model, tmp_path / "b")
    read = lambda d: json.loads((d / "adapter.json").read_text())["cola_bases"]
    assert read(tmp_path / "a") == read(tmp_path / "b")


def residual_base_of(model):
    """A plain model holding `model`'s current base weights (CoLA svd: the residuals), as a user would get by
    saving the injected model's state dict and loading it into a fresh base."""
    plain = tiny_model(bias=True)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    return plain


@pytest.mark.parametrize("wrong", ["other_weights", "residual_base", "tampered_checksum"])
def test_cola_load_refuses_a_base_that_does_not_rebuild_the_residual(tmp_path, wrong):
    """Another base of the same config, the residual base itself (CoLA would subtract the top-r part twice), or
    a checksum that does not match: one-line refusal, and the model is left exactly as it was; the original
    plain base then loads the same adapter."""
    model = tiny_model(bias=True)
    plain = copy.deepcopy(model)
    inject(model, acfg_of("cola"))
    randomize(model)
    d = tmp_path / "ad"
    save_adapter(model, d)
    target = {"other_weights": lambda: tiny_model(bias=True, seed=1), "residual_base": lambda: residual_base_of(model),
              "tampered_checksum": lambda: copy.deepcopy(plain)}[wrong]()
    if wrong == "tampered_checksum":
        meta = json.loads((d / "adapter.json").read_text())
        meta["cola_bases"]["model.layers.3.mlp.down_proj"] = "0" * 16
        (d / "adapter.json").write_text(json.dumps(meta))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    grads = [p.requires_grad for p in target.parameters()]
    where = "model.layers.3.mlp.down_proj" if wrong == "tampered_checksum" else "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=f"CoLA base weight of {where} in this model has checksum .* "
                                         f"load onto the original plain base the adapter was trained on") as e:
        load_adapter(target, d)
    assert "\n" not in str(e.value)
    assert not hasattr(target, "adapter_config") and not hasattr(target, "adapter_banks")
    assert all(type(m) is nn.Linear for n, m in target.named_modules() if n.endswith(adapters.TARGETS))
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in target.parameters()] == grads
    if wrong != "tampered_checksum":
        load_adapter(plain, d)
        idx = torch.randint(0, 61, (2, 5))
        with torch.no_grad():
            assert torch.equal(plain(idx), model(idx))


def test_cola_fresh_process_rebuilds_the_residual_from_the_plain_base(tmp_path):
    """A new interpreter (one thread, while this one may use more) loads the adapter onto the plain base: the base
    checksums agree, its SVD rebuilds the residuals, and its logits equal ours up to fp32 rounding (an SVD on
    another thread count is not bit for bit the same)."""
    saved, theirs, their_logits, ours = reload_in_fresh_process(tiny_model(L=3, bias=True), acfg_of("cola", seed=5), tmp_path,
                                                                "_cola_bases")
    assert theirs == saved["cola_bases"]
    torch.testing.assert_close(their_logits, ours, rtol=1e-5, atol=1e-5)
