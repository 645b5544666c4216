"""Tests of RaSA and MoSA (adapters.py, on kernels.py) against references rebuilt here: SPEC.md's dense
formulas (RaSA's B diag(D) A, MoSA's ΔW rebuilt block by block from π), SPEC's parameter counts, autograd
through a plain gather, finite differences, an untied per-layer copy of the pool, a fresh process; plus
torch.compile against eager for EVERY adapter of adapters.py. Tiny shapes; run:
    python -m pytest -q test_sharing.py
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adapters
import kernels
from adapters import AdapterConfig, inject, load_adapter, param_report, save_adapter, val
from model import ModelConfig
from test_adapters import VARIANTS as OTHER_VARIANTS
from test_adapters import (adapted, check_cli_error, check_dropout_on_adapter_input, check_forward_equals_dense,
                           check_identity_at_init, check_merge_unmerge, check_param_count,
                           check_save_load_round_trip, loss_of, randomize, shapes, spec_count, tiny_model)

HERE = Path(__file__).parent

# tiny model: hidden 32, q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48, L = 5
VARIANTS = {
    "rasa": dict(adapter="rasa", r=4, alpha=8.0),                      # k = max(1, 4 // 8) = 1
    "rasa_k2": dict(adapter="rasa", r=4, alpha=8.0, rasa_k=2),
    "rasa_k_eq_r": dict(adapter="rasa", r=3, alpha=8.0, rasa_k=3),    # no private part
    "mosa": dict(adapter="mosa", r=2, targets=",".join(adapters.TARGETS)),  # K = r (d_out + d_in)
    "mosa_K37": dict(adapter="mosa", mosa_k=37),                      # K does not divide any N here
}
RASA = [n for n in VARIANTS if n.startswith("rasa")]
MOSA = [n for n in VARIANTS if n.startswith("mosa")]


def acfg_of(name, **kw):
    return AdapterConfig(**{**VARIANTS[name], **kw})


def named(model):
    return dict(model.named_parameters())


def rasa_weight(model, name, mod):
    """SPEC.md: W0 + B_l diag(D^priv) A_l + B_S diag(D^shared) A_S, from the named tensors (the pool under
    adapter_banks.<type>.{A_S,B_S}.0), with torch.diag and plain matmuls."""
    P, typ = named(model), name.rsplit(".", 1)[1]
    acfg = model.adapter_config
    k, r, L = acfg.rasa_k, acfg.r, model.config.n_layers
    D = P[f"{name}.D"]
    assert D.shape == (r - k + k * L,)
    W = mod.weight + P[f"adapter_banks.{typ}.B_S.0"] @ torch.diag(D[r - k:]) @ P[f"adapter_banks.{typ}.A_S.0"]
    if r > k:
        W = W + P[f"{name}.B"] @ torch.diag(D[:r - k]) @ P[f"{name}.A"]
    return W


def mosa_weight(mod):
    """SPEC.md: W0 + ΔW with ΔW built block by block from π alone: the first N mod K blocks of π have size
    ceil(N/K), the others floor(N/K), and every flat index in block k gets λ_k (independent of g)."""
    perm, _ = mod.partition()
    N, K = mod.weight.numel(), mod.K
    dW, start = torch.full((N,), float("nan")), 0
    for k in range(K):
        size = N // K + (k < N % K)
        dW[perm[start:start + size].long()] = mod.lam[k]
        start += size
    assert start == N and not dW.isnan().any()
    return mod.weight + dW.view_as(mod.weight)


def dense_weight(model, name, mod):
    return rasa_weight(model, name, mod) if isinstance(mod, adapters.RaSA) else mosa_weight(mod)


# -----------------------------------------------------------------------------
# config defaults and bad input


def test_method_defaults_follow_spec():
    m = AdapterConfig(adapter="mosa")
    assert m.r == 32 and m.target_list == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"] and m.mosa_k is None
    assert AdapterConfig(adapter="rasa").rasa_k == 1 and AdapterConfig(adapter="rasa", r=16).rasa_k == 2
    assert AdapterConfig(adapter="rasa", r=23).rasa_k == 2 and AdapterConfig(adapter="rasa", r=4).rasa_k == 1
    other = AdapterConfig(adapter="lora")
    assert other.r == 8 and other.target_list == list(adapters.TARGETS) and other.rasa_k is None
    import argparse
    ap = adapters.add_dataclass_args(argparse.ArgumentParser(), AdapterConfig)
    ns = ap.parse_args(["--adapter", "mosa"])
    assert adapters.dataclass_from_args(AdapterConfig, ns) == m
    ns = ap.parse_args(["--adapter", "rasa", "--r", "16", "--targets", "q_proj"])
    assert adapters.dataclass_from_args(AdapterConfig, ns) == AdapterConfig(adapter="rasa", r=16, rasa_k=2, targets="q_proj")


@pytest.mark.parametrize("kw,msg", [
    (dict(adapter="rasa", r=4, rasa_k=0), "rasa_k \\(k\\) must be in \\[1, r=4\\], got 0: pass --rasa_k"),
    (dict(adapter="rasa", r=4, rasa_k=5), "rasa_k \\(k\\) must be in \\[1, r=4\\], got 5"),
    (dict(adapter="mosa", mosa_k=0), "mosa_k \\(K\\) must be >= 1, got 0"),
    (dict(adapter="mosa", mosa_k=32 * 32 + 1, targets="q_proj"), "K=1025 groups outside \\[1, d_out·d_in=1024\\] "
                                                                   "for q_proj \\(32x32\\)"),
    (dict(adapter="mosa", mosa_k=16 * 32 + 1), "K=513 groups outside \\[1, d_out·d_in=512\\] for k_proj"),
    (dict(adapter="mosa", r=11, targets="k_proj"), "K=528 groups outside .*: lower --r or pass --mosa_k"),
    (dict(adapter="mosa", dropout=0.1), "dropout must be 0 for mosa"),
    (dict(adapter="mosa", seed=-1), "seed must be in \\[0, 2\\^64\\) for mosa")])
def test_bad_rasa_and_mosa_input_is_refused_with_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        inject(tiny_model(L=2), AdapterConfig(**kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,msg", [
    ("--model llama3-8b --adapter rasa --rasa_k 9", "error: rasa_k (k) must be in [1, r=8], got 9"),
    ("--model llama3-8b --adapter mosa --mosa_k 16777217 --targets q_proj",
     "error: mosa: K=16777217 groups outside [1, d_out·d_in=16777216] for q_proj (4096x4096)")])
def test_cli_bad_rasa_mosa_input_prints_one_error_line(capsys, argv, msg):
    check_cli_error(capsys, argv.split(), msg)


# -----------------------------------------------------------------------------
# forward: identity at init, the dense formulas, dropout


@pytest.mark.parametrize("name", VARIANTS)
def test_is_identity_at_init(name):
    check_identity_at_init(acfg_of(name))


def test_rasa_init_matches_spec():
    """D^priv = alpha / (2 (r-k)), D^shared = alpha / (2 k L) (no alpha / r factor); A's Kaiming-uniform
    U(-1/sqrt(d_in), 1/sqrt(d_in)), B's zero, the pool's too."""
    L, r, k, alpha = 5, 6, 2, 12.0
    model = tiny_model(L)
    inject(model, AdapterConfig(adapter="rasa", r=r, rasa_k=k, alpha=alpha))
    for n, mod in adapted(model):
        want = torch.cat([torch.full((r - k,), alpha / (2 * (r - k))), torch.full((k * L,), alpha / (2 * k * L))])
        assert torch.equal(mod.D, want)
        A_S, B_S = val(mod.A_S), val(mod.B_S)
        assert mod.A.shape == (r - k, mod.d_in) and A_S.shape == (k * L, mod.d_in)
        assert mod.B.shape == (mod.d_out, r - k) and B_S.shape == (mod.d_out, k * L)
        for A in (mod.A, A_S):
            assert A.abs().max() <= 1 / math.sqrt(mod.d_in) and A.std() > 0.4 / math.sqrt(mod.d_in)
        assert not mod.B.any() and not B_S.any()


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_dense_formula(name):
    check_forward_equals_dense(acfg_of(name), lambda model, n, mod, xt: dense_weight(model, n, mod))


@pytest.mark.parametrize("name", ["rasa", "rasa_k2"])
def test_rasa_dropout_one_mask_on_adapter_input_only(name):
    """Training, p = 0.5: y = W0 x + b + (B_l diag(D^priv) A_l + B_S diag(D^shared) A_S) dropout(x), with
    ONE mask for the private and the shared path (reproduced by reseeding: a second draw would differ)."""
    model = tiny_model(bias=True)
    inject(model, acfg_of(name, dropout=0.5))
    randomize(model)
    model.train()
    n, mod = adapted(model)[0]
    check_dropout_on_adapter_input(mod, lambda i, xt: rasa_weight(model, n, mod))


def test_mosa_bf16_base_rounds_once_and_keeps_lam_fp32():
    model = tiny_model().to(torch.bfloat16)
    params = inject(model, acfg_of("mosa"))
    randomize(model)
    assert all(p.dtype == torch.float32 for p in params)
    n, mod = adapted(model)[0]
    x = torch.randn(3, mod.d_in, dtype=torch.bfloat16)
    y = mod(x)
    W = (mod.weight.float() + mod.lam.detach()[mod.partition()[1].long()]).bfloat16()  # fp32 sum, one rounding
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, W))
    y.float().sum().backward()
    assert mod.lam.grad.dtype == torch.float32


# -----------------------------------------------------------------------------
# parameter counts and index memory


@pytest.mark.parametrize("L,hidden,inter", [(5, 32, 48), (4, 48, 40), (7, 16, 64)])
@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_spec_formula(L, hidden, inter, name):
    check_param_count(acfg_of(name, targets="q_proj,k_proj,o_proj,down_proj"), L, hidden, inter)


@pytest.mark.parametrize("name", MOSA)
def test_mosa_index_memory_in_report_equals_cached_partitions(name):
    """The report (computed from shapes, works on meta) equals the bytes of the partitions actually built:
    one (π, g) pair per distinct (shape, K), int32, shared by every module of that shape."""
    model = tiny_model(L=3)
    inject(model, acfg_of(name))
    mods = [m for _, m in adapted(model)]
    parts = {}
    for m in mods:
        perm, g = m.partition()
        assert perm.dtype == g.dtype == torch.int32
        parts.setdefault((m.d_out, m.d_in), (perm, g))
        assert parts[m.d_out, m.d_in][0] is perm and parts[m.d_out, m.d_in][1] is g  # one cached copy per shape
    rep = param_report(model)["mosa"]
    assert rep["index_bytes"] == sum(p.nbytes + g.nbytes for p, g in parts.values())
    assert sorted(tuple(p["shape"]) for p in rep["partitions"]) == sorted(parts)
    assert sum(p["modules"] for p in rep["partitions"]) == len(mods)


def test_mosa_indices_are_not_per_layer_buffers():
    model = tiny_model(L=3)
    before = [n for n, _ in model.named_buffers()]
    inject(model, acfg_of("mosa"))
    assert [n for n, _ in model.named_buffers()] == before                        # inject adds no buffer
    assert not any(t.dtype in (torch.int32, torch.int64) for t in model.state_dict().values())
    assert set(adapters.adapter_params(model)) == {f"{n}.lam" for n, _ in adapted(model)}
    twin = copy.deepcopy(model).double()                                          # follows .to(): looked up
    for (_, a), (_, b) in zip(adapted(model), adapted(twin)):
        assert a.partition()[1] is b.partition()[1] and b.lam.dtype == torch.float64


@pytest.mark.parametrize("adapter,extra", [("rasa", []), ("rasa", ["--r", "16", "--rasa_k", "4"]), ("mosa", []),
                                           ("mosa", ["--mosa_k", "1000", "--targets", "q_proj,o_proj"])])
def test_cli_param_report_llama3_8b(capsys, adapter, extra):
    """The command line on the llama3-8b preset (meta device): SPEC's counts per type, the reference base
    count 8,030,261,248, and (MoSA) 4 + 4 bytes of int32 index per weight entry per distinct shape."""
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, *extra, "--json"])
    rep = json.loads(capsys.readouterr().out)
    acfg = AdapterConfig(**rep["adapter"])
    cfg = ModelConfig.from_hf_dict(adapters.PRESETS["llama3-8b"])
    want = {t: spec_count(acfg, 32, *shapes(cfg)[t]) for t in acfg.target_list}
    assert {t: e["trainable"] for t, e in rep["by_type"].items()} == want
    assert rep["trainable"] == sum(want.values()) and rep["base"] == 8_030_261_248
    if adapter == "mosa":
        assert "--targets" in extra or acfg.target_list == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        assert "--r" in extra or acfg.r == 32
        distinct = {shapes(cfg)[t] for t in acfg.target_list}
        assert rep["mosa"]["index_bytes"] == sum(8 * d_in * d_out for d_in, d_out in distinct)
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, *extra])                # the readable table
    out = capsys.readouterr().out
    assert f"trainable {sum(want.values()):,} | base 8,030,261,248" in out
    assert ("MoSA partition index memory" in out) == (adapter == "mosa")


# -----------------------------------------------------------------------------
# gradients: the pool, λ


@pytest.mark.parametrize("name", ["rasa", "rasa_k2"])
def test_rasa_pool_grad_is_sum_of_per_layer_grads(name):
    """Untied reference: every layer gets its own private copy of the pool (same values); the shared pool's
    gradient must equal the sum of the copies' gradients, and every per-layer tensor's gradient must match."""
    base = tiny_model(L=4)
    tied = copy.deepcopy(base)
    inject(tied, acfg_of(name))
    randomize(tied)
    untied = copy.deepcopy(tied)
    for _, mod in adapted(untied):  # replace the Shared handles by per-layer Parameters holding the same values
        mod.A_S, mod.B_S = (nn.Parameter(val(h).detach().clone()) for h in (mod.A_S, mod.B_S))
    del untied.adapter_banks
    lt, lu = loss_of(tied), loss_of(untied)
    torch.testing.assert_close(lt, lu)
    lt.backward(), lu.backward()
    P, U = named(tied), named(untied)
    pools = [n for n in adapters.adapter_params(tied) if n.startswith("adapter_banks.")]
    assert sorted(pools) == sorted(f"adapter_banks.{t}.{s}.0" for t in adapters.TARGETS for s in ("A_S", "B_S"))
    for pn in pools:
        _, typ, side, _ = pn.split(".")
        per_layer = [U[f"{n}.{side}"].grad for n, _ in adapted(untied) if n.endswith(typ)]
        assert len(per_layer) == 4 and all(g.abs().sum() > 0 for g in per_layer)
        torch.testing.assert_close(P[pn].grad, sum(per_layer), rtol=1e-5, atol=1e-7)
    for n in adapters.adapter_params(tied):
        if not n.startswith("adapter_banks."):
            torch.testing.assert_close(P[n].grad, U[n].grad, rtol=1e-5, atol=1e-7)


def test_rasa_pool_is_owned_once():
    """Once in parameters(), state_dict(), the optimizer; every layer uses that one tensor."""
    model = tiny_model(L=5)
    params = inject(model, acfg_of("rasa_k2"))
    pool = model.adapter_banks.q_proj.A_S["0"]
    assert pool.shape == (2 * 5, 32)
    assert sum(p is pool for p in params) == 1 and sum(p is pool for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "A_S" in k and "q_proj" in k] == ["adapter_banks.q_proj.A_S.0"]
    opt = torch.optim.AdamW(params)
    assert sum(p is pool for g in opt.param_groups for p in g["params"]) == 1
    assert all(val(blk.self_attn.q_proj.A_S) is pool for blk in model.model.layers)
    assert len(params) == len({id(p) for p in params})


@pytest.mark.parametrize("form", kernels.FORMS)
@pytest.mark.parametrize("name", MOSA)
def test_mosa_lam_grad_equals_autograd_through_plain_gather(monkeypatch, form, name):
    """Through the adapter (whichever reduction form pick_form returns, both forced here): grad λ, grad x and
    grad b equal autograd's through y = x (W0 + λ[g])ᵀ + b with a plain int64 gather."""
    monkeypatch.setattr(kernels, "_FORM_CACHE", {})
    monkeypatch.setenv("NANOMASA_MOSA_FORM", form)
    model = tiny_model(bias=True)
    inject(model, acfg_of(name))
    randomize(model)
    for n, mod in adapted(model)[:7]:
        x = torch.randn(2, 5, mod.d_in, requires_grad=True)
        cot = torch.randn(2, 5, mod.d_out)
        wrt = [x, mod.lam] + ([mod.bias] if mod.bias is not None else [])
        if mod.bias is not None:
            mod.bias.requires_grad_(True)
        got = torch.autograd.grad(mod(x), wrt, cot)
        lam = mod.lam.detach().clone().requires_grad_()
        ref_wrt = [x, lam] + wrt[2:]
        y = F.linear(x, mod.weight + lam[mod.partition()[1].long()], mod.bias)
        for a, b in zip(got, torch.autograd.grad(y, ref_wrt, cot)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if mod.bias is not None:
            mod.bias.requires_grad_(False)
    assert kernels._FORM_CACHE == {"cpu": form}


@pytest.mark.parametrize("form", kernels.FORMS)
def test_mosa_lam_grad_matches_finite_differences(monkeypatch, form):
    monkeypatch.setattr(kernels, "_FORM_CACHE", {})
    monkeypatch.setenv("NANOMASA_MOSA_FORM", form)
    model = tiny_model(L=1, hidden=8, inter=12, bias=True)
    inject(model, AdapterConfig(adapter="mosa", mosa_k=7, targets="k_proj,down_proj"))
    for _, mod in adapted(model):
        mod.double()
        lam = torch.randn(mod.K, dtype=torch.float64, requires_grad=True)
        x = torch.randn(3, mod.d_in, dtype=torch.float64, requires_grad=True)
        f = lambda lam, x: torch.func.functional_call(mod, {"lam": lam}, (x,))
        assert torch.autograd.gradcheck(f, (lam, x))


# -----------------------------------------------------------------------------
# merge, save/load


@pytest.mark.parametrize("name", VARIANTS)
def test_merge_equals_dense_formula_and_unmerged_and_unmerge_restores_w0(name):
    # MoSA merges into the forward's own W0 + ΔW, so merged equals unmerged bit for bit
    check_merge_unmerge(acfg_of(name), want_weight=dense_weight, exact=name in MOSA)


@pytest.mark.parametrize("name", ["rasa", "rasa_k_eq_r", "mosa_K37"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    base, meta = check_save_load_round_trip(acfg_of(name, seed=3), tmp_path / "ad")
    if name in MOSA:
        parts = {tuple(p["shape"]): p for p in meta["partitions"]}
        for _, m in adapted(base):
            p = parts[m.d_out, m.d_in]
            assert p["K"] == m.K and p["seed"] == 3 and p["checksum"] == kernels.partition_checksum(*m.partition())
            # built from the adapter's seed: the partition kernels.py gives for seed 3, not for another one
            assert torch.equal(m.partition()[1], kernels.mosa_partition(m.d_out, m.d_in, m.K, 3)[1])
            assert not torch.equal(m.partition()[1], kernels.mosa_partition(m.d_out, m.d_in, m.K, 4)[1])


def test_mosa_load_refuses_a_partition_with_another_checksum(tmp_path):
    model = tiny_model()
    inject(model, acfg_of("mosa"))
    save_adapter(model, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter.json"
    meta = json.loads(f.read_text())
    meta["partitions"][1]["checksum"] = "0" * 16
    f.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has checksum .* says 0000000000000000: this kernels.py builds another") as e:
        load_adapter(tiny_model(), tmp_path / "ad")
    assert "\n" not in str(e.value)


def test_mosa_fresh_process_rebuilds_partition_from_saved_seed(tmp_path):
    """A new interpreter (one thread, nothing cached) loads the adapter: the partitions it rebuilds from the
    seed in adapter.json have the saved checksums, and its logits equal ours."""
    model = tiny_model(L=3, bias=True)
    torch.save(model.state_dict(), tmp_path / "base.pt")
    inject(model, acfg_of("mosa_K37", seed=2**63 + 7))
    randomize(model)
    save_adapter(model, tmp_path / "ad")
    idx = torch.randint(0, 61, (2, 6))
    torch.save(idx, tmp_path / "idx.pt")
    code = f"""
import json, torch, adapters, kernels
from model import Transformer
from test_adapters import tiny_cfg
assert not kernels._PARTITIONS
m = Transformer(tiny_cfg(3, True))
m.load_state_dict(torch.load({str(tmp_path / 'base.pt')!r}))
adapters.load_adapter(m, {str(tmp_path / 'ad')!r})
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / 'idx.pt')!r})), {str(tmp_path / 'logits.pt')!r})
print(json.dumps(adapters._partitions(m)))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "ad" / "adapter.json").read_text())["partitions"]
    assert theirs == saved and len(saved) == 4                                   # q/o, k/v, gate/up, down
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(idx), rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# torch.compile == eager, for every adapter


class WithShared(nn.Module):
    """One adapted layer plus the shared tensors it reads, so check_compiled compares their gradients too."""

    def __init__(self, mod):
        super().__init__()
        self.mod = mod
        self.shared = nn.ParameterList([h() for h in vars(mod).values() if isinstance(h, adapters.Shared)])

    def forward(self, x):
        return self.mod(x)


ALL = {**{f"{k}": v for k, v in OTHER_VARIANTS.items()}, **VARIANTS}
INDUCTOR = ["lora", "dora", "masa", "rasa", "mosa"]


@pytest.mark.parametrize("name,backend", [(n, "aot_eager") for n in ALL] + [(n, "inductor") for n in INDUCTOR])
def test_every_adapter_compiles_and_equals_eager(name, backend):
    """torch.compile(fullgraph=True) of one adapted layer (training mode, dropout off) gives eager's output
    and the gradients of x, of the layer's own tensors and of the shared ones it uses."""
    model = tiny_model(L=2, bias=True)
    kw = dict(r=4, alpha=8.0) if name in OTHER_VARIANTS else {}
    inject(model, AdapterConfig(**{**kw, **ALL[name]}))
    randomize(model)
    n, mod = adapted(model)[0]
    layer = WithShared(mod).train()
    assert all(p.requires_grad for p in layer.parameters() if p is not mod.weight and p is not mod.bias)
    x = torch.randn(2, 5, mod.d_in, requires_grad=True)
    assert kernels.check_compiled(layer, x, backend=backend, rtol=1e-5, atol=1e-5) >= 1
