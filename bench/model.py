"""
bench/model.py -- model.py against transformers on the same random checkpoint (a few hundred M params):
load time, peak RSS while loading, forward tokens/s in fp32 and bf16. Prints a Markdown table with ratios.

Each loader runs in a fresh subprocess: the kernel's peak-RSS mark (VmHWM) is reset right before loading
(/proc/self/clear_refs), and we report the peak minus the RSS before loading, against the size of the
loaded weights. Forward speed is measured in one more process that holds both models and alternates
them rep by rep (best rep counts), so load from other jobs on a shared machine hits both alike.

Run:  .venv/bin/python -m bench model [--layers 16 --hidden 1024 --seq 128 --bf16_seq 64 --reps 8 --rounds 2]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import REPO  # the repository root, where the loader children run


def vm_mb(key):
    """VmRSS / VmHWM of this process in MiB, from /proc/self/status (Linux)."""
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))


def loader(who, d, dtype=torch.float32):
    if who == "hf":
        from transformers import LlamaForCausalLM  # resolved here so lazy imports are not timed as loading
        return lambda: LlamaForCausalLM.from_pretrained(d, dtype=dtype)
    from model import Transformer
    return lambda: Transformer.from_pretrained(d, dtype=dtype)


def child_load(a):
    """Load once in this fresh process; print load time, peak RSS above the pre-load RSS, weight size."""
    who, _, cast = a.who.partition(":")  # "ours:bf16" = load the fp32 file as bf16 (a cast on the way in)
    load = loader(who, a.dir, torch.bfloat16 if cast else torch.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = vm_mb("VmRSS")
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    peak_mb = vm_mb("VmHWM") - base
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    idx = torch.zeros(1, 8, dtype=torch.long)
    with torch.inference_mode():  # a lazily mapped checkpoint pays its page-ins here
        t0 = time.perf_counter()
        model(idx)
        first_s = time.perf_counter() - t0
    print(json.dumps(dict(load_s=load_s, peak_mb=peak_mb, weights_mb=weights_mb, first_s=first_s,
                          after_first_mb=vm_mb("VmHWM") - base)))


def child_forward(a):
    """Both models in one process, timed alternately: best-of-reps tokens/s for fp32 and bf16."""
    models = {who: loader(who, a.dir)() for who in ("ours", "hf")}
    calls = {"ours": lambda m, x: m(x), "hf": lambda m, x: m(x).logits}
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(a.dir) / "config.json").read_text())["vocab_size"]
    idx = torch.randint(0, min(1000, vocab), (a.batch, a.seq), generator=g)  # the same ids whenever vocab >= 1000
    out = {}
    for dt, T in (("fp32", a.seq), ("bf16", a.bf16_seq)):
        if dt == "bf16":
            for m in models.values():
                m.to(torch.bfloat16)
        x = idx[:, :T]
        wall = {w: float("inf") for w in models}
        cpu = dict(wall)
        with torch.inference_mode():
            for rep in range(a.reps + 1):  # rep 0 warms up
                for w, m in models.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    calls[w](m, x)
                    if rep:  # wall time suffers from other jobs; CPU time (all threads) much less so
                        wall[w] = min(wall[w], time.perf_counter() - t0)
                        cpu[w] = min(cpu[w], time.process_time() - c0)
        out[dt] = {w: (x.numel() / wall[w], x.numel() / cpu[w]) for w in models}
    print(json.dumps(out))


def write_checkpoint(d, a):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():  # cheap random weights: speed and memory do not depend on the values
        p.data.normal_(0, 0.02)
    model.save_pretrained(d)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128, help="fp32 forward length")
    p.add_argument("--bf16_seq", type=int, default=64, help="bf16 forward length (slow on CPUs without native bf16)")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dir", default=None, help="reuse a checkpoint folder instead of writing a temporary one")
    p.add_argument("--who", default=None, help=argparse.SUPPRESS)  # internal: run one loader in this process
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.who:
        return child_forward(a) if a.who == "forward" else child_load(a)
    with tempfile.TemporaryDirectory() as tmp:
        d = a.dir or tmp
        n = write_checkpoint(d, a) if a.dir is None else None
        argv_child = [sys.executable, "-m", "bench.model", "--dir", d, "--threads", str(a.threads),
                      "--batch", str(a.batch), "--seq", str(a.seq), "--bf16_seq", str(a.bf16_seq), "--reps", str(a.reps)]

        def run(who):
            r = subprocess.run(argv_child + ["--who", who], capture_output=True, text=True, cwd=REPO)
            if r.returncode:
                sys.exit(f"error: {who} run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            return json.loads(r.stdout.strip().splitlines()[-1])
        runs = {w: [] for w in ("ours", "hf", "ours:bf16", "hf:bf16")}  # ":bf16" loads the fp32 file as bf16
        for _ in range(a.rounds):  # interleaved, so a busy spell on the shared machine hits both loaders
            for who in runs:
                runs[who].append(run(who))
        fwd = run("forward")
    keys = ("load_s", "peak_mb", "weights_mb", "first_s", "after_first_mb")
    o, h, co, ch = ({k: min(r[k] for r in rs) for k in keys} for rs in runs.values())
    size = f"{n / 1e6:.0f}M params, " if n else ""
    print(f"model.py vs transformers: Llama {size}{a.layers} layers, hidden {a.hidden}, GQA {a.heads}/{a.kv_heads}, "
          f"vocab {a.vocab}; fp32 checkpoint; {a.threads} threads; load: best of {a.rounds} fresh processes each; "
          f"forward: best of {a.reps} alternating reps\n")
    print("| measurement | model.py | transformers | ratio (ours / theirs) |")
    print("|---|---|---|---|")
    print(f"| load time (s) | {o['load_s']:.3f} | {h['load_s']:.3f} | {o['load_s'] / h['load_s']:.2f} |")
    print(f"| peak RSS while loading, above pre-load RSS (MiB) | {o['peak_mb']:.0f} | {h['peak_mb']:.0f} | "
          f"{o['peak_mb'] / max(h['peak_mb'], 1):.2f} |")
    print(f"| same, / weights ({o['weights_mb']:.0f} MiB) | {o['peak_mb'] / o['weights_mb']:.2f}x | "
          f"{h['peak_mb'] / h['weights_mb']:.2f}x | |")
    print(f"| load with a cast fp32 -> bf16: time (s) | {co['load_s']:.2f} | {ch['load_s']:.2f} | "
          f"{co['load_s'] / ch['load_s']:.2f} |")
    print(f"| load with a cast: peak RSS / bf16 weights ({co['weights_mb']:.0f} MiB) | {co['peak_mb'] / co['weights_mb']:.2f}x | "
          f"{ch['peak_mb'] / ch['weights_mb']:.2f}x | {co['peak_mb'] / ch['peak_mb']:.2f} |")
    print(f"| first forward after load, T=8 (s; pages in a mapped checkpoint) | {o['first_s']:.2f} | {h['first_s']:.2f} | "
          f"{o['first_s'] / h['first_s']:.2f} |")
    print(f"| peak RSS through the first forward (MiB) | {o['after_first_mb']:.0f} | {h['after_first_mb']:.0f} | "
          f"{o['after_first_mb'] / h['after_first_mb']:.2f} |")
    for dt, T in (("fp32", a.seq), ("bf16", a.bf16_seq)):
        (ow, oc), (hw, hc) = fwd[dt]["ours"], fwd[dt]["hf"]
        print(f"| forward {dt} tokens/s, wall (B={a.batch}, T={T}) | {ow:.0f} | {hw:.0f} | {ow / hw:.2f} |")
        print(f"| forward {dt} tokens per CPU-second (B={a.batch}, T={T}) | {oc:.0f} | {hc:.0f} | {oc / hc:.2f} |")


if __name__ == "__main__":
    main()
