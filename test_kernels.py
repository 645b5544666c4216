"""Tests for kernels.py: the MoSA partition, the two segmented reductions and the MoSA linear, each
against a reference rebuilt here (a pure-Python SplitMix64, loops, autograd through a gather, finite
differences, a fresh process, eager PyTorch). Run: python -m pytest -q test_kernels.py"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import (mosa_linear, mosa_linear_ref, mosa_partition, partition_checksum, segment_sum_index,
                     segment_sum_index_ref, segment_sum_perm, segment_sum_perm_ref)

# (h, d, K): K divides N = h·d, K does not, K = 1, K = N (every entry its own group)
SHAPES = [(6, 8, 12), (7, 9, 10), (5, 3, 1), (4, 5, 20), (33, 17, 50)]
SHAPE_IDS = ["K|N", "K!|N", "K=1", "K=N", "K!|N-larger"]


def test_splitmix64_matches_pure_python_reference():
    # Vigna's splitmix64.c: state += GOLDEN; z = state; three xor-shift-multiply rounds
    seed, mask = 0xDEADBEEF12345, (1 << 64) - 1
    state, expected = seed, []
    for _ in range(50):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        expected.append(z ^ (z >> 31))
    assert [int(v) for v in kernels.splitmix64(seed, 50)] == expected


def test_perm_is_argsort_of_unsigned_splitmix64_keys():
    # the definition the saved seed refers to, rebuilt with Python ints: π = argsort(keys) as uint64
    h, d, seed = 9, 11, 2**64 - 5
    keys = [int(v) for v in kernels.splitmix64(seed, h * d)]
    assert len(set(keys)) == h * d                                               # no ties to break
    expected = sorted(range(h * d), key=keys.__getitem__)
    assert mosa_partition(h, d, 4, seed)[0].tolist() == expected


@pytest.mark.parametrize("h,d,K", SHAPES, ids=SHAPE_IDS)
def test_partition_groups_are_floor_ceil_and_cover_each_index_once(h, d, K):
    perm, group_id = mosa_partition(h, d, K, seed=7)
    N = h * d
    assert perm.dtype == torch.int32 and group_id.dtype == torch.int32 and group_id.shape == (h, d)
    assert torch.equal(torch.sort(perm.long()).values, torch.arange(N))         # π is a permutation
    sizes = torch.bincount(group_id.reshape(-1).long(), minlength=K)
    assert sizes.numel() == K                                                    # ids in [0, K)
    q, r = N // K, N % K
    expected = torch.tensor([q + 1] * r + [q] * (K - r))                         # first N mod K blocks larger
    assert torch.equal(sizes, expected)
    # block k of π is exactly group k: walking π position by position gives 0,0,..,1,1,..,K-1
    assert torch.equal(group_id.reshape(-1)[perm.long()].long(), torch.repeat_interleave(torch.arange(K), expected))


def test_partition_depends_on_seed_is_random_and_cached():
    p1, g1 = mosa_partition(16, 16, 32, seed=1)
    p2, g2 = mosa_partition(16, 16, 32, seed=2)
    assert not torch.equal(p1, p2) and partition_checksum(p1, g1) != partition_checksum(p2, g2)
    assert not torch.equal(p1.long(), torch.arange(256))                         # actually shuffled
    assert mosa_partition(16, 16, 32, seed=1)[0] is p1                           # computed once per key


def test_partition_must_be_built_before_compiling():
    kernels.clear_partition_cache()
    f = torch.compile(lambda x: x + mosa_partition(3, 5, 4, seed=8)[1], backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="before torch.compile"):
        f(torch.zeros(3, 5))
    mosa_partition(3, 5, 4, seed=8)                                              # built eagerly: now it traces
    torch.testing.assert_close(f(torch.zeros(3, 5)), mosa_partition(3, 5, 4, seed=8)[1].float())


def test_partition_rebuilt_in_fresh_process_is_bit_identical(tmp_path):
    h, d, K, seed = 48, 37, 101, 2**63 + 12345
    out = tmp_path / "part.pt"
    code = ("import torch, kernels; p, g = kernels.mosa_partition(%d, %d, %d, %d); "
            "torch.save({'perm': p, 'group_id': g, 'sum': kernels.partition_checksum(p, g)}, %r)"
            % (h, d, K, seed, str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1")                                  # other thread count too
    subprocess.run([sys.executable, "-c", code], cwd=Path(kernels.__file__).parent, env=env, check=True)
    theirs = torch.load(out)
    perm, group_id = mosa_partition(h, d, K, seed)
    assert theirs["sum"] == partition_checksum(perm, group_id)
    assert torch.equal(theirs["perm"], perm) and torch.equal(theirs["group_id"], group_id)


def test_checksum_sees_a_single_swap_and_ignores_index_dtype():
    perm, group_id = mosa_partition(8, 8, 5, seed=3)
    c = partition_checksum(perm, group_id)
    assert partition_checksum(perm.long(), group_id.long()) == c
    p2, g2 = perm.clone(), group_id.clone().reshape(-1)
    i, j = p2[0].item(), p2[-1].item()                                           # first and last blocks differ
    p2[0], p2[-1] = j, i
    g2[i], g2[j] = g2[j].clone(), g2[i].clone()
    assert partition_checksum(p2, g2.view(8, 8)) != c


@pytest.mark.parametrize("K", [0, -1, 8 * 8 + 1, 2.0])
def test_K_out_of_range_refused(K):
    with pytest.raises(ValueError) as e:
        mosa_partition(8, 8, K, seed=0)
    assert "\n" not in str(e.value) and "K=" in str(e.value)


@pytest.mark.parametrize("h,d,K", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduction_forms_agree_with_each_other_and_loop_references(h, d, K, dtype):
    perm, group_id = mosa_partition(h, d, K, seed=11)
    G = torch.randn(h, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, b = segment_sum_perm(G, perm, K), segment_sum_index(G, group_id, K)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (K,)   # fp32 accumulation
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, segment_sum_perm_ref(G, perm, K))
    torch.testing.assert_close(b, segment_sum_index_ref(G, group_id, K))
    # scatter reference in float64 over the flat index -> group map, independent of both forms
    ref = torch.zeros(K, dtype=torch.float64).scatter_add_(0, group_id.reshape(-1).long(), G.reshape(-1).double())
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", kernels.FORMS)
@pytest.mark.parametrize("h,d,K", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_mosa_grads_match_autograd_through_gather(form, h, d, K):
    perm, group_id = mosa_partition(h, d, K, seed=5)
    gen = torch.Generator().manual_seed(1)
    x, W0, b, lam = (torch.randn(*s, generator=gen) for s in [(2, 3, d), (h, d), (h,), (K,)])
    cot = torch.randn(2, 3, h, generator=gen)
    grads = []
    for f in (mosa_linear, mosa_linear_ref):
        leaves = [t.clone().requires_grad_() for t in (x, b, lam)]
        y = f(leaves[0], W0, leaves[1], leaves[2], group_id, perm, form)
        grads.append((y, *torch.autograd.grad(y, leaves, cot)))
    for got, want in zip(*grads):                                                # y, grad x, grad b, grad λ
        torch.testing.assert_close(got, want)
    # and the forward equals the dense formula built by an explicit loop over entries
    dW = torch.tensor([[lam[group_id[i, j]] for j in range(d)] for i in range(h)])
    torch.testing.assert_close(grads[0][0], x @ (W0 + dW).T + b)


@pytest.mark.parametrize("form", kernels.FORMS)
def test_mosa_grads_match_finite_differences_float64(form):
    h, d, K = 5, 7, 6
    perm, group_id = mosa_partition(h, d, K, seed=9)
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(h, d, generator=gen, dtype=torch.float64)
    x, b, lam = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in [(3, d), (h,), (K,)])
    assert torch.autograd.gradcheck(lambda x, b, lam: mosa_linear(x, W0, b, lam, group_id, perm, form), (x, b, lam))


def test_bf16_forward_rounds_once_like_merge():
    h, d, K = 6, 8, 10
    perm, group_id = mosa_partition(h, d, K, seed=1)
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(h, d, generator=gen).bfloat16()
    x = torch.randn(4, d, generator=gen).bfloat16()
    lam = (torch.randn(K, generator=gen) * 1e-2).requires_grad_()
    y = mosa_linear(x, W0, None, lam, group_id, perm, "index")
    merged = (W0.float() + lam.detach()[group_id.long()]).bfloat16()             # W0 += ΔW in fp32, one rounding
    torch.testing.assert_close(y, F.linear(x, merged), rtol=0, atol=0)
    y.float().sum().backward()
    assert lam.grad.dtype == torch.float32


def test_W0_must_be_frozen():
    perm, group_id = mosa_partition(4, 4, 3, seed=0)
    with pytest.raises(ValueError, match="frozen"):
        mosa_linear(torch.randn(2, 4), torch.randn(4, 4, requires_grad=True), None,
                    torch.zeros(3, requires_grad=True), group_id, perm)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_no_dense_weight_alive(compiled):
    # every saved (h, d) float tensor must BE W0 (same storage): W0 + ΔW is rebuilt in backward
    h, d, K = 64, 48, 100
    perm, group_id = mosa_partition(h, d, K, seed=3)
    x, W0, lam = torch.randn(5, d, requires_grad=True), torch.randn(h, d), torch.randn(K, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(mosa_linear, backend="aot_eager", fullgraph=True) if compiled else mosa_linear
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = f(x, W0, None, lam, group_id, perm, "index")
    dense = [t for t in saved if t.shape == (h, d) and t.is_floating_point()]
    assert dense and all(t.data_ptr() == W0.data_ptr() for t in dense)
    y.sum().backward()
    assert lam.grad is not None and x.grad is not None


def test_pick_form_measures_once_and_obeys_env(monkeypatch):
    monkeypatch.setattr(kernels, "_FORM_CACHE", {})
    assert kernels.pick_form("cpu") in kernels.FORMS and "cpu" in kernels._FORM_CACHE
    for form in kernels.FORMS:
        monkeypatch.setenv("NANOMASA_MOSA_FORM", form)
        assert kernels.pick_form("cpu", measure=True) == form
    monkeypatch.setenv("NANOMASA_MOSA_FORM", "atomic")
    with pytest.raises(ValueError, match="NANOMASA_MOSA_FORM"):
        kernels.pick_form("cpu", measure=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("fn,index", [(segment_sum_perm, "perm"), (segment_sum_index, "group_id")])
def test_reductions_trace_fullgraph(fn, index, backend):
    perm, group_id = mosa_partition(7, 9, 10, seed=4)
    G = torch.randn(7, 9, requires_grad=True)
    kernels.check_compiled(fn, G, perm if index == "perm" else group_id, 10, backend=backend)


@pytest.mark.parametrize("form,backend", [("index", "aot_eager"), ("perm", "aot_eager"), ("index", "inductor")])
def test_compiled_mosa_linear_matches_eager(form, backend):
    h, d, K = 6, 10, 7
    perm, group_id = mosa_partition(h, d, K, seed=3)
    x, b, lam = torch.randn(2, 3, d, requires_grad=True), torch.randn(h), torch.randn(K, requires_grad=True)
    kernels.check_compiled(mosa_linear, x, torch.randn(h, d), b, lam, group_id, perm, form, backend=backend)


def test_check_compiled_refuses_a_silent_eager_fallback():
    with torch._dynamo.config.patch(disable=True), pytest.raises(AssertionError, match="ran eagerly"):
        kernels.check_compiled(lambda x: x * 2, torch.randn(3, requires_grad=True), backend="eager",
                               fullgraph=False)                                 # torch.compile is a no-op here


def test_check_compiled_catches_a_mismatch():
    # the helper itself must fail when the compiled function computes something else than eager
    def f(x):
        return x * 2 if torch.compiler.is_compiling() else x
    with pytest.raises(AssertionError):
        kernels.check_compiled(f, torch.randn(3, requires_grad=True), backend="eager")


# -----------------------------------------------------------------------------
# this file's name is also Hugging Face's `kernels` package (transformers >= 5.25 imports it)

def _run_here(code, pythonpath=""):
    """Run `code` in a fresh interpreter from this folder, as a script or notebook here would."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_kernels_names_come_from_the_package_this_file_shadows(tmp_path):
    # a stand-in for Hugging Face's package, later on sys.path, with a submodule imported by absolute
    # name as the real one does (`from kernels._internals.layer import Mode`)
    pkg = tmp_path / "kernels"
    (pkg / "_internals").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from kernels._internals.layer import Mode\n")
    (pkg / "_internals" / "__init__.py").write_text("")
    (pkg / "_internals" / "layer.py").write_text("Mode = 'hub Mode'\n")
    r = _run_here("import kernels; from kernels import Mode; from kernels._internals import layer\n"
                  "print(Mode, layer.Mode, kernels.__file__ == kernels.mosa_partition.__globals__['__file__'],"
                  " kernels.mosa_partition.__module__)", pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hub", "Mode", "hub", "Mode", "True", "kernels"]


def test_hub_kernels_name_without_the_package_is_one_clear_line():
    r = _run_here("from kernels import CUDAProperties")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: kernels.py: 'CUDAProperties' is not nanoMASA's"), r.stderr
    assert "Hugging Face's `kernels` package" in last and "transformers <= 5.24" in last
    assert _run_here("import kernels; print(hasattr(kernels, '__wrapped__'))").stdout.strip() == "False"
