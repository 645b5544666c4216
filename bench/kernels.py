"""
bench/kernels.py -- the MoSA weight-gradient reduction, side by side in one run (SPEC.md "MoSA").

For an (h, d) weight and K = m·(h + d) groups (m = the LoRA rank with the same budget) it times, on one
random dense gradient G (h, d):
  autograd     torch.autograd.grad of λ[g] (int64 map) w.r.t. λ, i.e. autograd's backward of a gather
  index_add    kernels.segment_sum_index over the cached int32 group-id map
  permutation  kernels.segment_sum_perm: gather through the int32 π, contiguous balanced segments
and, with --tokens M > 0, a whole linear forward+backward on M tokens: kernels.mosa_linear against
kernels.mosa_linear_ref (plain autograd through the gather). Best of --reps after one warm-up, the
candidates alternating within each repetition (the CPU is shared).

Run:  python -m bench kernels                       (4096x4096, m = 32 and 1, fp32, ~2 minutes on 2 cores)
      python -m bench kernels --h 1024 --d 1024 --mult 4 --reps 2 --device cpu
"""
import argparse
import platform
import time

import torch

import kernels


def best_ms(fns, reps, device):
    """{name: fn} -> {name: best ms}. Candidates alternate within each repetition, so load from other
    processes on a shared machine hits all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {name: float("inf") for name in fns}
    for rep in range(reps + 1):                                                   # rep 0 is the warm-up
        for name, fn in fns.items():
            sync(); t0 = time.perf_counter(); fn(); sync()
            if rep:
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--h", type=int, default=4096, help="d_out of the weight")
    p.add_argument("--d", type=int, default=4096, help="d_in of the weight")
    p.add_argument("--mult", default="32,1", help="comma list of m, K = m·(h + d)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--tokens", type=int, default=512, help="M tokens for the whole-linear rows; 0 skips them")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    h, d = args.h, args.d
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    G = torch.randn(h, d, generator=gen, device=dev)                              # (h, d) dense ∇_ΔW L

    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, fp32, weight {h}x{d}, best of {args.reps}\n")
    rows, full = [], []
    for m in [int(s) for s in args.mult.split(",")]:
        K = m * (h + d)
        t0 = time.perf_counter()
        perm, group_id = kernels.mosa_partition(h, d, K, args.seed, device=dev)
        t_part = time.perf_counter() - t0
        g64 = group_id.long()
        lam = torch.zeros(K, device=dev, requires_grad=True)
        out = lam[g64]                                                           # (h, d) the gather
        a = kernels.segment_sum_index(G, group_id, K)
        tol = dict(rtol=1e-4, atol=1e-6 * (h * d // K))                          # fp32 sums of ~N/K terms
        torch.testing.assert_close(kernels.segment_sum_perm(G, perm, K), a, **tol)  # same numbers, all three
        torch.testing.assert_close(torch.autograd.grad(out, lam, G, retain_graph=True)[0], a, **tol)
        t = best_ms({"autograd": lambda: torch.autograd.grad(out, lam, G, retain_graph=True),
                     "index": lambda: kernels.segment_sum_index(G, group_id, K),
                     "perm": lambda: kernels.segment_sum_perm(G, perm, K)}, args.reps, dev)
        rows.append((m, K, t_part, t["autograd"], t["index"], t["perm"]))
        if args.tokens:
            x = torch.randn(args.tokens, d, generator=gen, device=dev, requires_grad=True)
            W0 = torch.randn(h, d, generator=gen, device=dev) / d**0.5
            cot = torch.randn(args.tokens, h, generator=gen, device=dev)
            def fwd_bwd(f, form):
                return lambda: torch.autograd.grad(f(x, W0, None, lam, group_id, perm, form), (x, lam), cot)
            step = best_ms({"ref": fwd_bwd(kernels.mosa_linear_ref, None),
                            "index": fwd_bwd(kernels.mosa_linear, "index"),
                            "perm": fwd_bwd(kernels.mosa_linear, "perm")}, args.reps, dev)
            full.append((m, K, step["ref"], step["index"], step["perm"]))
        del out, lam, g64

    print("| m | K = m(h+d) | build partition (s) | autograd bwd of λ[g] (ms) | index_add (ms) | permutation (ms) "
          "| autograd / index_add | autograd / permutation |")
    print("|---|---|---|---|---|---|---|---|")
    for m, K, t_part, t_ag, t_ix, t_pm in rows:
        print(f"| {m} | {K} | {t_part:.2f} | {t_ag:.1f} | {t_ix:.1f} | {t_pm:.1f} | **{t_ag / t_ix:.1f}x** "
              f"| {t_ag / t_pm:.2f}x |")
    if full:
        print(f"\nWhole linear, forward + backward (grad x and grad λ), {args.tokens} tokens:\n")
        print("| m | K | autograd through gather (ms) | mosa_linear index (ms) | mosa_linear perm (ms) "
              "| ref / index | ref / perm |")
        print("|---|---|---|---|---|---|---|")
        for m, K, t_ref, t_ix, t_pm in full:
            print(f"| {m} | {K} | {t_ref:.1f} | {t_ix:.1f} | {t_pm:.1f} | {t_ref / t_ix:.2f}x | {t_ref / t_pm:.2f}x |")
    print(f"\npick_form({dev.type}) -> {kernels.pick_form(dev)}")


if __name__ == "__main__":
    main()
