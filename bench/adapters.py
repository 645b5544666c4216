"""
bench/adapters.py -- one training step (forward, backward, AdamW) of a mid-size random LLaMA for each
adapter, side by side with LoRA at the same r in one run, and our LoRA step against transformers + peft.
RaSA (k = 1) and MoSA (K = r·(d_out + d_in), LoRA's budget) adapt the same seven projections as LoRA, and so
do CoLA (M = 2, N = 3), MultiLoRA (n = 3) and BSLoRA (ranks 2, 4, 8, slice sharing); LoRAMoE, MoELoRA and
MTL-LoRA run at the same r with their papers' targets (task ids: one per sequence).
VeRA and VB-LoRA (issue 8) run at their papers' own budgets, not at r = 8: VeRA at r = 256 (peft's default)
and r = 1024 (its Llama rank), VB-LoRA at r = 4 with a bank of h = 2048 vectors of b = 256, k = 2 (its Llama-2
setting); a note after the table compares their parameter counts with LoRA r = 8 on this model.

Model: hidden 1024, 8 layers, 16 query / 4 key-value heads, d_ff 2816, vocabulary 8192 (smaller than
Llama's 128k on purpose: with a 128k head the frozen LM head would dominate the step and hide the
adapters), sequence 256, batch 2, fp32 on CPU, all seven projections adapted, r = 8.
Time: CPU time of the process (and wall time), median over interleaved rounds (every variant once per
round, so load from other processes hits all alike); one thread by default, because on a shared 2-core
machine a second OpenMP thread that gets descheduled stalls every small parallel op (we measured LoRA's
rank-8 matmuls 80x slower with 2 threads under load than with 1; --threads 2 on a quiet machine).
Memory: measured in a child process: growth of the peak RSS during one step (peak reset through
/proc/self/clear_refs; glibc's mmap threshold fixed low there so freed tensors leave the RSS at once,
which would slow the timed steps, hence the separate process), i.e. activations + gradients +
temporaries; the frozen weights are shared by every variant and not counted.

Run:  python -m bench adapters [--rounds 3] [--batch 2] [--seq 256] [--threads 1] [--no-peft]
      python -m bench adapters --variants lora,rasa,mosa --no-peft          (issue 4: RaSA and MoSA vs LoRA)
      python -m bench adapters --variants lora,prompt_tuning,p_tuning_v2 --no-peft   (issue 8: soft prompts)
      python -m bench adapters --variants lora,vera,vblora --no-peft        (issue 8: VeRA and VB-LoRA vs LoRA)
"""
import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

from adapters import TARGETS, TASK_GATED, AdapterConfig, inject, param_report, set_task
from bench import REPO  # the repository root, where the memory child runs
from bench.model import vm_mb  # one reader of /proc/self/status for every benchmark
from model import ModelConfig, Transformer

VARIANTS = {  # name -> AdapterConfig overrides (r = 8 everywhere)
    "lora": dict(adapter="lora"),
    "masa (sum, N=5, S=2)": dict(adapter="masa", num_a=5, share_group=2),
    "masa (router, N=5, S=2)": dict(adapter="masa", num_a=5, share_group=2, agg="router"),
    "hydralora (n_B=3)": dict(adapter="hydralora", num_b=3),
    "dora": dict(adapter="dora"),
    "rasa (k=1)": dict(adapter="rasa", rasa_k=1),
    "mosa (K=r(h+d), seven targets)": dict(adapter="mosa", targets=",".join(TARGETS)),
    "prompt_tuning (P=20)": dict(adapter="prompt_tuning"),   # no projection adapted: 20 extra input tokens
    "p_tuning_v2 (P=20)": dict(adapter="p_tuning_v2"),       # 20 trained keys/values per layer
    "loramoe (N=6, gate,up,down)": dict(adapter="loramoe", num_a=6),          # the paper's FFN-only targets
    "moelora (N=4, T=4)": dict(adapter="moelora", num_a=4, num_tasks=4),      # rank r split among 4 experts
    "mtllora (n=3, T=4, q,k,v,o)": dict(adapter="mtllora", num_tasks=4),      # the authors' targets
    "cola (M=2, N=3, svd)": dict(adapter="cola", num_a=2, num_b=3),
    "multilora (n=3)": dict(adapter="multilora", num_a=3),
    "bslora (2,4,8 slice)": dict(adapter="bslora"),
    # issue 8, at the papers' budgets (their own r overrides --r): see the parameter note printed after the table
    "vera (r=256)": dict(adapter="vera", r=256),
    "vera (r=1024)": dict(adapter="vera", r=1024),
    "vblora (r=4, h=2048, b=256, k=2)": dict(adapter="vblora", r=4, vb_num_vectors=2048, vb_vector_len=256, vb_topk=2),
}
# goals as multiples of LoRA: time, memory, and whether one largest adapted weight is added to LoRA's memory
# first (MoSA rebuilds a dense W0 + ΔW and forms a dense weight gradient: one weight-sized temporary at a time)
GOALS = {"masa (sum, N=5, S=2)": (1.05, 1.05, False), "hydralora (n_B=3)": (1.2, 1.2, False),
         "dora": (1.3, 1.3, False), "rasa (k=1)": (1.15, None, False),
         "mosa (K=r(h+d), seven targets)": (1.6, 1.1, True), "cola (M=2, N=3, svd)": (1.1, 1.1, False),
         "multilora (n=3)": (1.1, 1.1, False), "bslora (2,4,8 slice)": (1.1, 1.1, False)}


def peak_growth_mib(fn):
    """Growth of the peak RSS (MiB) during one call of fn()."""
    gc.collect()
    before = vm_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    fn()
    return vm_mb("VmHWM") - before


def cpu_wall(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def our_step(model, opt, idx, tgt):
    def step():
        loss = model(idx, tgt)[1]  # do not keep the (B, T, V) logits alive through backward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peft_step(idx, tgt, base, cfg, r):
    """transformers LlamaForCausalLM + peft LoRA on the same weights (assigned, not copied)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    hcfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    hcfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hcfg)
    hf.load_state_dict(base.state_dict(), assign=True)
    pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.cat([idx[:, :1], tgt], 1)[:, :-1]  # HF shifts labels itself: labels[t+1] = tgt[t]

    def step():
        pm(input_ids=idx, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def param_note(name, rep, cfg):
    """One line: the trainable (and VeRA's frozen / VB-LoRA's stored) parameters of `rep` against LoRA r = 8 on
    the same model, all seven projections."""
    with torch.device("meta"):
        lora = Transformer(cfg)
    inject(lora, AdapterConfig(adapter="lora", r=8))
    n8 = param_report(lora)["trainable"]
    line = f"{name}: trainable {rep['trainable']:,} = {rep['trainable'] / n8:.3f}x LoRA r=8 ({n8:,})"
    if "vera" in rep:
        line += f"; plus a frozen random pair of {rep['vera']['frozen']:,} values (not trained, not saved)"
    if "vblora" in rep:
        v = rep["vblora"]
        line += (f" (bank {v['bank']:,} + logits {v['logits']:,}); stored once trained (the paper's §3.4 count) "
                 f"{v['stored']['params']:,.0f} = {v['stored']['params'] / n8:.3f}x LoRA r=8")
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the docstring)")
    ap.add_argument("--no-peft", action="store_true", help="skip the transformers + peft comparison")
    ap.add_argument("--variants", default="", help="comma list of adapters to run (e.g. lora,rasa,mosa); all if empty")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)  # internal: memory run
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:  # glibc: fixed low mmap threshold, so freed tensors leave the RSS at once
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    cfg = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, n_layers=8, n_heads=16,
                      n_kv_heads=4, head_dim=64, rope_theta=500000.0, max_position_embeddings=4096)
    torch.manual_seed(0)
    base = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    steps, notes = {}, []
    chosen = [v for v in a.variants.split(",") if v]
    for name, kw in VARIANTS.items():
        if chosen and kw["adapter"] not in chosen:
            continue
        # shares the frozen weights; CoLA's svd init replaces them by its residual, so it gets its own copy
        model = copy.deepcopy(base, {} if kw["adapter"] == "cola" else {id(p): p for p in base.parameters()})
        params = inject(model, AdapterConfig(**{"r": a.r, "alpha": 2 * a.r, **kw}))
        if kw["adapter"] in TASK_GATED:  # one task id per sequence, every task in the batch when it fits
            set_task(model, torch.arange(a.batch) % kw["num_tasks"])
        steps[name] = our_step(model.train(), torch.optim.AdamW(params, lr=1e-4), idx, tgt)
        if kw["adapter"] == "mosa":
            notes.append(f"{name}: partition index memory (built at inject, outside the measured step) "
                         f"{param_report(model)['mosa']['index_bytes'] / 2**20:.1f} MiB")
        if kw["adapter"] in ("vera", "vblora"):
            notes.append(param_note(name, param_report(model), cfg))
    largest = max(m.weight.numel() * m.weight.element_size() for n, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS) / 2**20  # MiB
    if not a.no_peft:
        steps["transformers + peft lora"] = peft_step(idx, tgt, base, cfg, a.r)
    for fn in steps.values():  # warm-up: allocator, AdamW state, first-call overheads
        fn()
    if a.memory_child:  # one measured step per variant, in this separate process (allocator set above)
        print(json.dumps({k: peak_growth_mib(fn) for k, fn in steps.items()}))
        return
    res = {k: ([], []) for k in steps}
    for _ in range(a.rounds):
        for k, fn in steps.items():
            for col, v in zip(res[k], cpu_wall(fn)):
                col.append(v)
    cpu, wall = ({k: statistics.median(v[i]) for k, v in res.items()} for i in range(2))
    child = subprocess.run([sys.executable, "-m", "bench.adapters", "--memory-child",
                            *(argv if argv is not None else sys.argv[1:])],
                           capture_output=True, text=True, check=True, cwd=REPO)
    mem = json.loads(child.stdout.strip().splitlines()[-1])
    tok = a.batch * a.seq
    print(f"One training step (forward, backward, AdamW), fp32 CPU, {torch.get_num_threads()} thread(s), hidden "
          f"{cfg.hidden_size}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, batch {a.batch} x seq {a.seq}, r = {a.r}, "
          f"all seven projections; median of {a.rounds} interleaved rounds. Ratios use CPU time (robust to other "
          f"processes on a shared machine); wall time shown too.\n")
    print("| step | CPU s | wall s | tokens/s (CPU) | CPU / LoRA | wall / LoRA | peak mem growth MiB | mem / LoRA | goal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for k in res:
        goal = ""
        if k in GOALS:
            t_x, m_x, plus_w = GOALS[k]
            ok = cpu[k] / cpu["lora"] <= t_x
            goal = f"<= {t_x}x time"
            if m_x is not None:
                ok = ok and mem[k] <= m_x * (mem["lora"] + (largest if plus_w else 0))
                goal += f", <= {m_x}x " + (f"(LoRA's memory + one largest weight, {largest:.0f} MiB)" if plus_w else "memory")
            goal += f": {'met' if ok else 'MISSED'}"
        print(f"| {k} | {cpu[k]:.3f} | {wall[k]:.3f} | {tok / cpu[k]:,.0f} | {cpu[k] / cpu['lora']:.3f} | "
              f"{wall[k] / wall['lora']:.3f} | {mem[k]:.0f} | {mem[k] / mem['lora']:.3f} | {goal} |")
    for line in notes:
        print(f"\n{line}")
    k = "transformers + peft lora"
    if k in cpu:
        ratio = cpu[k] / cpu["lora"]
        print(f"\nour LoRA tokens/s / transformers+peft tokens/s = {ratio:.3f} by CPU time, "
              f"{wall[k] / wall['lora']:.3f} by wall time (goal >= 1.2: {'met' if ratio >= 1.2 else 'MISSED'}); "
              f"peak memory growth ours / theirs = {mem['lora'] / mem[k]:.3f}")

if __name__ == "__main__":
    main()
