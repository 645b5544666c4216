"""
kernels.py -- the few custom kernels nanoMASA needs, each beside a plain-PyTorch reference.

MoSA (Wang et al., 2026; SPEC.md "MoSA") trains one scalar λ_k per random group of weight entries:
ΔW[i, j] = λ[g(i, j)], y = (W0 + ΔW) x. This file holds everything below the adapter class:

1. `mosa_partition(h, d, K, seed)`: the balanced random tessellation, from our own generator
   (SplitMix64 keys, argsort), identical on every device, torch version and thread count; cached per
   shape; `partition_checksum` is stored with the adapter so a reload can prove it rebuilt the same one;
   `partition_nbytes` gives its index memory from the shape alone (the parameter report uses it).
2. Segmented reductions ∂L/∂λ_k = Σ_{(i,j) in group k} ∇_W L[i, j], accumulated in fp32, two forms:
   `segment_sum_perm` (gather through π, contiguous balanced blocks, no atomics: the paper's GPU form)
   and `segment_sum_index` (`index_add_` by the group-id map: ~5-8x faster on a 2-core CPU), each with
   a loop reference of the same signature. `pick_form(device)` chooses per device by measurement.
3. `mosa_linear`: a custom autograd.Function. Forward builds W0 + ΔW and runs one F.linear; backward
   rebuilds W (it is never kept alive between forward and backward: the rebuild sits in a custom op,
   `mosa_grad_input`, so torch.compile cannot merge it with the forward's and save W), computes grad_x
   and the dense weight gradient, and reduces the latter per group. `mosa_linear_ref` is plain autograd.
4. `check_compiled(fn, *args)`: asserts torch.compile(fn, fullgraph=True) matches eager, outputs and
   gradients; used by the tests of every kernel and adapter.

Run:  python -m pytest -q test_kernels.py      python -m bench kernels   (CPU, fp32, a few minutes)
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. balanced random tessellation

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)


def splitmix64(seed, n):
    """Outputs 1..n of SplitMix64 (Steele, Lea & Flood, 2014; Vigna's reference C) seeded with `seed`,
    as a (n,) uint64 numpy array. Output i is the mixer applied to seed + i·GOLDEN (mod 2^64); the mixer
    is a bijection and GOLDEN is odd, so the n outputs are pairwise DISTINCT for n < 2^64."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps mod 2^64 on purpose
        z = np.arange(1, n + 1, dtype=np.uint64)                        # (n,) counters 1..n
        z *= np.uint64(_GOLDEN)
        z += np.uint64(seed)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def block_sizes(N, K):
    """Rule for the K contiguous blocks of π: the FIRST r = N mod K blocks have size q + 1 = ceil(N/K),
    the other K - r have size q = floor(N/K). Returns (q, r)."""
    return divmod(N, K)


def _check_partition_args(h, d, K, seed):
    for name, v in (("h", h), ("d", d), ("K", K), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"mosa_partition: {name}={v!r} must be an int")
    if h < 1 or d < 1:
        raise ValueError(f"mosa_partition: weight shape ({h}, {d}) must be positive")
    if not 1 <= K <= h * d:
        raise ValueError(f"mosa: K={K} outside [1, h*d={h * d}] for a ({h}, {d}) weight; "
                         f"use 1 <= K <= {h * d} (lower --r or --mosa_k)")
    if not 0 <= seed < 2**64:
        raise ValueError(f"mosa_partition: seed={seed} must be in [0, 2^64)")


def _index_dtype(max_value):
    # int32 halves the index memory (and index_select/index_add_ accept it); int64 only when needed
    return torch.int32 if max_value <= torch.iinfo(torch.int32).max else torch.int64


_PARTITIONS = {}  # (h, d, K, seed, device) -> (perm, group_id); one partition per shape, shared by layers


def _build_partition_cpu(h, d, K, seed):
    N = h * d
    # π = argsort of N distinct 64-bit keys: the result does not depend on the sort algorithm, the
    # thread count or the library version (no ties to break), unlike torch.randperm's stream.
    keys = splitmix64(seed, N) ^ np.uint64(1 << 63)  # flip the top bit: unsigned order == int64 order
    perm = torch.argsort(torch.from_numpy(keys.view(np.int64)), stable=True)     # (N,) int64
    del keys
    perm = perm.to(_index_dtype(N - 1))                                           # (N,) π
    q, r = block_sizes(N, K)
    sizes = torch.full((K,), q, dtype=torch.int64)
    sizes[:r] += 1                                                                # first r blocks: q+1
    blocks = torch.repeat_interleave(torch.arange(K, dtype=_index_dtype(K - 1)), sizes)  # (N,) block of π-position
    group_id = torch.empty(N, dtype=blocks.dtype)
    group_id[perm.long()] = blocks                                                # g(π[p]) = block(p)
    return perm, group_id.view(h, d)


def mosa_partition(h, d, K, seed, device="cpu"):
    """Balanced random tessellation of an (h, d) weight into K groups (SPEC.md "MoSA").
    h, d: weight shape (d_out, d_in); K: number of groups, 1 <= K <= N = h·d; seed: int in [0, 2^64).
    Returns perm (N,) π over flat indices i·d + j, block k = π[start_k : start_k + size_k] (sizes by
    `block_sizes`), and group_id (h, d) with group_id.flatten()[π[p]] = block of position p. Both int32
    when they fit. Cached per (h, d, K, seed, device): callers share the tensors and must not modify them."""
    _check_partition_args(h, d, K, seed)
    device = torch.empty(0, device=device).device  # normalise "cuda" -> "cuda:0"
    key = (int(h), int(d), int(K), int(seed), str(device))
    if key not in _PARTITIONS:
        if torch.compiler.is_compiling():  # numpy hashing does not trace; lookups of built ones do
            raise RuntimeError(f"mosa_partition{key[:4]} on {key[4]} is not built yet: call it eagerly "
                               "(in the adapter's __init__) before torch.compile")
        cpu_key = key[:4] + ("cpu",)
        if cpu_key not in _PARTITIONS:  # built once on CPU, then copied to each device
            _PARTITIONS[cpu_key] = _build_partition_cpu(*key[:4])
        perm, group_id = _PARTITIONS[cpu_key]
        _PARTITIONS[key] = (perm.to(device), group_id.to(device))
    return _PARTITIONS[key]


def partition_nbytes(h, d, K):
    """Bytes of mosa_partition(h, d, K, ...)'s two index tensors, π (N,) and g (h, d), without building them."""
    N = h * d
    return N * (_index_dtype(N - 1).itemsize + _index_dtype(K - 1).itemsize)


def clear_partition_cache():
    _PARTITIONS.clear()


def partition_checksum(perm, group_id):
    """sha256 (first 16 hex digits) of the partition: shape, K, π and g as little-endian int64, so the
    checksum is the same whatever the device or the index dtype. perm (N,), group_id (h, d)."""
    h, d = group_id.shape
    K = int(group_id.max()) + 1
    digest = hashlib.sha256(f"mosa-partition-v1 {h}x{d} K={K}\n".encode())
    for t in (perm.reshape(-1), group_id.reshape(-1)):
        for chunk in t.split(1 << 22):  # bounded host memory for large weights
            digest.update(chunk.to("cpu", torch.int64).numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# 2. segmented reductions: ∂L/∂λ_k = Σ_{(i,j): g(i,j)=k} G[i, j], in fp32, without dense masks


def acc_dtype(G):
    """fp32 accumulation for fp16/bf16/fp32 gradients; fp64 stays fp64 (finite-difference tests)."""
    return torch.promote_types(G.dtype, torch.float32)


def segment_sum_perm(G, perm, K):
    """Paper's form: gather G through π, then sum contiguous balanced blocks (no atomics).
    G (h, d) any float dtype; perm (N,) int32/int64 π from mosa_partition; K int. Returns (K,) acc_dtype."""
    N = G.numel()
    q, r = block_sizes(N, K)
    split = r * (q + 1)                                               # first r blocks have size q+1
    Gp = G.reshape(-1).index_select(0, perm)                          # (N,) G in block order
    big = Gp[:split].view(r, q + 1).sum(1, dtype=acc_dtype(G))        # (r,)
    small = Gp[split:].view(K - r, q).sum(1, dtype=acc_dtype(G))      # (K - r,)
    return torch.cat([big, small])


def segment_sum_perm_ref(G, perm, K):
    """Plain loop over blocks, same signature as segment_sum_perm. Tiny shapes only."""
    q, r = block_sizes(G.numel(), K)
    flat, out, start = G.reshape(-1).to(acc_dtype(G)), [], 0
    for k in range(K):
        size = q + 1 if k < r else q
        out.append(flat[perm[start:start + size].long()].sum())
        start += size
    return torch.stack(out)


def segment_sum_index(G, group_id, K):
    """Accumulate by the group-id map with index_add_ into fp32 (atomics on GPU; a serial scatter on
    CPU, which avoids the memory-bound random gather and measured 5-8x faster than the permutation
    form here). G (h, d) any float dtype; group_id (h, d) int32/int64; K int. Returns (K,) acc_dtype."""
    out = torch.zeros(K, dtype=acc_dtype(G), device=G.device)        # (K,)
    return out.index_add_(0, group_id.reshape(-1), G.reshape(-1).to(out.dtype))


def segment_sum_index_ref(G, group_id, K):
    """Plain loop over groups with boolean masks, same signature as segment_sum_index. Tiny shapes only."""
    Gf = G.to(acc_dtype(G))
    return torch.stack([Gf[group_id == k].sum() for k in range(K)])


FORMS = ("index", "perm")
# Only used under torch.compile before anything was measured. cpu: measured by bench/kernels.py (index_add
# 4-8x faster on 2 cores); cuda: the paper's choice for GPUs, not measured in this lab.
_FORM_DEFAULT = {"cpu": "index", "cuda": "perm"}
_FORM_CACHE = {}  # device type -> chosen form


def pick_form(device, measure=False):
    """'index' or 'perm', whichever reduction is faster on `device`: env NANOMASA_MOSA_FORM if set, else a
    ~0.2 s microbenchmark at first use per device type (a 1024x4096 gradient, groups of 128), cached.
    Under torch.compile with nothing cached it returns _FORM_DEFAULT instead of timing."""
    dev = torch.device(device)
    if dev.type in _FORM_CACHE and not measure:
        return _FORM_CACHE[dev.type]
    if torch.compiler.is_compiling():
        return _FORM_DEFAULT.get(dev.type, "perm")
    form = os.environ.get("NANOMASA_MOSA_FORM", "")
    if form and form not in FORMS:
        raise ValueError(f"NANOMASA_MOSA_FORM={form!r} is not one of {FORMS}; unset it or pick one")
    if not form:
        N, q = 1024 * 4096, 128
        perm = torch.randperm(N, device=dev).int()             # any permutation will do for timing
        group_id = torch.empty(N, dtype=torch.int32, device=dev)
        group_id[perm.long()] = torch.arange(N, dtype=torch.int32, device=dev) // q
        G = torch.randn(1024, 4096, device=dev)
        times = {"index": _best_time(lambda: segment_sum_index(G, group_id, N // q), dev),
                 "perm": _best_time(lambda: segment_sum_perm(G, perm, N // q), dev)}
        form = min(times, key=times.get)
    _FORM_CACHE[dev.type] = form
    return form


def _best_time(fn, device, reps=3):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(); sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); sync()
        best = min(best, time.perf_counter() - t0)
    return best


def segment_sum(G, group_id, perm, K, form):
    """Dispatch: G (h, d); group_id (h, d); perm (N,) or None; K int; form in FORMS. Returns (K,) acc_dtype."""
    if form == "perm":
        return segment_sum_perm(G, perm, K)
    return segment_sum_index(G, group_id, K)


# -----------------------------------------------------------------------------
# 3. the MoSA linear


def mosa_delta(lam, group_id):
    """ΔW[i, j] = λ[g(i, j)]. lam (K,) fp32; group_id (h, d) int. Returns (h, d) in lam's dtype."""
    return lam.index_select(0, group_id.reshape(-1)).view(group_id.shape)


def mosa_weight(W0, lam, group_id):
    """W = W0 + ΔW, added in fp32 and rounded ONCE to W0's dtype (merge should use this function, so a
    merged model equals the unmerged one bit for bit).
    W0 (h, d) any float dtype; lam (K,) fp32; group_id (h, d) int. Returns (h, d) in W0.dtype."""
    return (W0 + mosa_delta(lam, group_id)).to(W0.dtype)                    # (h, d)


@torch.library.custom_op("nanomasa::mosa_grad_input", mutates_args=())
def mosa_grad_input(grad_out: torch.Tensor, W0: torch.Tensor, lam: torch.Tensor,
                    group_id: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_out (W0 + ΔW), with W0 + ΔW rebuilt here. grad_out (..., h); W0 (h, d); lam (K,);
    group_id (h, d). Returns (..., d). A custom op because it must stay OPAQUE to torch.compile: traced
    in the open, AOTAutograd's CSE merges this rebuild with the forward's and then saves the dense
    W0 + ΔW between forward and backward, the memory MoSA is meant not to spend (test_kernels.py checks)."""
    return grad_out @ mosa_weight(W0, lam, group_id)


@mosa_grad_input.register_fake
def _(grad_out, W0, lam, group_id):
    return grad_out.new_empty(*grad_out.shape[:-1], W0.shape[1])


class MoSALinear(torch.autograd.Function):
    """y = x (W0 + ΔW)ᵀ + b, SPEC.md "MoSA". Saves x, W0, λ and the index maps (all alive anyway), never
    the dense W0 + ΔW; backward rebuilds it for grad_x and reduces the dense weight gradient per group."""

    @staticmethod
    def forward(ctx, x, W0, bias, lam, group_id, perm, form):
        # x (..., d) compute dtype; W0 (h, d) frozen; bias (h,) or None; lam (K,) fp32 λ;
        # group_id (h, d) int g; perm (N,) int π or None (needed when form == "perm"); form in FORMS
        if ctx.needs_input_grad[1]:
            raise ValueError("mosa_linear: W0 must be frozen (requires_grad=False); MoSA trains only λ")
        ctx.save_for_backward(x, W0, lam, group_id, perm)
        ctx.form, ctx.has_bias = form, bias is not None
        return F.linear(x, mosa_weight(W0, lam, group_id), bias)   # (..., h)

    @staticmethod
    def backward(ctx, grad_out):
        # grad_out (..., h)
        x, W0, lam, group_id, perm = ctx.saved_tensors
        h, d = W0.shape
        grad_x = grad_bias = grad_lam = None
        if ctx.needs_input_grad[0]:
            grad_x = mosa_grad_input(grad_out, W0, lam, group_id)         # (..., d), W rebuilt inside
        if ctx.needs_input_grad[3]:
            G = grad_out.reshape(-1, h).t() @ x.reshape(-1, d)           # (h, d) dense ∇_ΔW L
            grad_lam = segment_sum(G, group_id, perm, lam.shape[0], ctx.form).to(lam.dtype)  # (K,)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, h).sum(0)                   # (h,)
        return grad_x, None, grad_bias, grad_lam, None, None, None


def mosa_linear(x, W0, bias, lam, group_id, perm=None, form=None):
    """y = x (W0 + ΔW)ᵀ + b with ΔW[i, j] = λ[g(i, j)].
    x (..., d); W0 (h, d) frozen; bias (h,) or None; lam (K,) fp32; group_id (h, d) int;
    perm (N,) int or None; form None (= pick_form(x.device)), "index" or "perm". Returns (..., h)."""
    form = form or pick_form(x.device)
    if form not in FORMS:
        raise ValueError(f"mosa_linear: form={form!r} is not one of {FORMS}")
    if form == "perm" and perm is None:
        raise ValueError("mosa_linear: form='perm' needs perm (the π returned by mosa_partition)")
    return MoSALinear.apply(x, W0, bias, lam, group_id, perm, form)


def mosa_linear_ref(x, W0, bias, lam, group_id, perm=None, form=None):
    """Plain autograd reference, same signature: gather λ[g] and let autograd do the backward."""
    return F.linear(x, (W0 + lam[group_id.long()]).to(W0.dtype), bias)


# -----------------------------------------------------------------------------
# 4. compiled == eager


def check_compiled(fn, *args, backend="inductor", fullgraph=True, seed=0, **tol):
    """Assert torch.compile(fn, backend, fullgraph) gives eager's output and the same gradients for
    every tensor arg and (if fn is an nn.Module) every parameter that requires grad, under one fixed
    random cotangent. fullgraph=True makes any graph break an error; the backend is wrapped to count
    graphs, so a silent fall-back to eager fails too. Resets dynamo's caches first (a test helper:
    earlier compilations of the same code would otherwise count against the recompile limit).
    tol: rtol/atol for torch.testing.assert_close."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(fn, backend=counting_backend, fullgraph=fullgraph)
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []

    def run(f):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
        out = f(*leaves)
        wrt = [a for a in leaves if torch.is_tensor(a) and a.requires_grad] + params
        if not wrt:
            return out, []
        g = torch.Generator(device=out.device).manual_seed(seed)
        cot = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
        return out.detach(), torch.autograd.grad(out, wrt, cot)

    out_e, grads_e = run(fn)
    out_c, grads_c = run(compiled)
    assert len(graphs) >= 1, f"torch.compile produced no graph for {fn}: it ran eagerly"
    torch.testing.assert_close(out_c, out_e, **tol, msg=lambda m: f"compiled output != eager: {m}")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        torch.testing.assert_close(gc, ge, **tol, msg=lambda m: f"compiled grad #{i} != eager: {m}")
    return len(graphs)


# -----------------------------------------------------------------------------
# 5. this file's name is also Hugging Face's `kernels` package

# transformers >= 5.25 depends on Hugging Face's `kernels` package and imports it (`from kernels import
# Mode, ...`). Where this folder is on sys.path (a script or notebook run here, the tests), Python finds
# this file first. A name that is not ours is looked up in that package instead: this module takes the
# package's folder as its own __path__, so `kernels.<submodule>` imports find the package's files, and
# its __init__ runs in a second module object whose names we hand out. Without the package installed,
# such a name is one ImportError that says what collides and the fix.
_HUB = None  # Hugging Face's `kernels` package, once something asked for one of its names


def _hub_kernels():
    global _HUB, __path__
    if _HUB is None:
        import importlib.machinery
        import importlib.util
        import sys
        here = os.path.dirname(os.path.abspath(__file__))
        elsewhere = [p for p in sys.path if os.path.abspath(p or ".") != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or not spec.submodule_search_locations:
            return None
        __path__ = list(spec.submodule_search_locations)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _HUB = module
    return _HUB


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    hub = _hub_kernels()
    if hub is None:
        raise ImportError(
            f"kernels.py: {name!r} is not nanoMASA's; it belongs to Hugging Face's `kernels` package, which "
            f"transformers >= 5.25 imports and which this file shadows: pip install kernels, or use "
            f"transformers <= 5.24 (the tests pin 5.23.0)")
    return getattr(hub, name)
