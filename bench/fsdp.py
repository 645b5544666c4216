"""
bench/fsdp.py -- train.py --fsdp against DDP over 2 processes: memory per process and step time (issue 18).

A random Llama of a few hundred million parameters (written by transformers, fp32) and instruction-style data
(bench.train.setup), LoRA r on all seven projections, fp32 on the CPU (gloo), one thread per process. Each mode
runs train.py in 2 processes started here as torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so
each process's peak RSS comes from its own wait4. Reported per mode, the most over the 2 processes:
  base MiB      frozen base bytes the process holds: its FSDP shards (train.py's base_bytes_per_process), or the
                whole base under DDP (every weight, one copy per process)
  peak RSS MiB  the process's peak resident memory (torch itself ~0.3 GB; DDP's base is the memory-mapped
                checkpoint, counted as the pages it touched)
  step s        median optimizer-step time after the first --warmup steps (metrics.jsonl step_s)
Run:  python -m bench fsdp [--hidden 1024 --inter 2816 --layers 16 --vocab 32000 --steps 5 --seq 128]
"""
import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import REPO  # the repository root (train.py)
from bench import train as bench_train
from model import safetensors_header


def parse(argv):
    p = argparse.ArgumentParser(description="train.py --fsdp vs DDP over 2 processes: memory and step time")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)       # cutoff: tokens per example at most
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)       # micro-batches per step over both processes
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)      # alternating runs of each mode
    return p.parse_args(argv)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, log):
    """train.py `args` in 2 processes (as torchrun starts them); -> each process's peak RSS in MiB."""
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        f = open(f"{log}.{rank}", "w")
        procs.append((subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=REPO, env=env, stdout=f,
                                       stderr=subprocess.STDOUT), f))
    peaks = []
    for p, f in procs:
        _, status, ru = os.wait4(p.pid, 0)
        f.close()
        if status != 0:
            sys.exit(f"error: train.py {' '.join(map(str, args))} failed:\n{Path(f.name).read_text()[-2000:]}")
        peaks.append(ru.ru_maxrss / 1024)
    return peaks


def main(argv=None):
    a = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bench_train.setup(a, d)
        n_base = sum(math.prod(shape) for _, shape, _ in safetensors_header(d / "model" / "model.safetensors").values())
        common = ["--adapter", "lora", "--r", a.r, "--model", d / "model", "--data", d / "data", "--out", d / "out",
                  "--batch_size", a.batch, "--grad_accum", a.accum, "--cutoff", a.seq, "--max_steps", a.steps,
                  "--eval_every", 0, "--save_every", 0, "--dtype", "fp32", "--device", "cpu"]
        modes = {"DDP": [], "FSDP (--fsdp)": ["--fsdp"]}
        base, rss, step = {m: 0 for m in modes}, {m: [] for m in modes}, {m: [] for m in modes}
        for _ in range(a.rounds):  # modes alternate, so a change in machine load hits both alike
            for mode, extra in modes.items():
                shutil.rmtree(d / "out", ignore_errors=True)
                rss[mode] += launch([*common, *extra], d / "log")
                recs = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines()]
                base[mode] = recs[0].get("base_bytes_per_process", 4 * recs[0]["frozen"])
                step[mode] += [r["step_s"] for r in recs if "step_s" in r][a.warmup:]
    ddp = "DDP"
    print(f"\nLoRA r={a.r}, all seven projections, fp32 on CPU ({os.cpu_count()} cores, torch {torch.__version__}, gloo); "
          f"random Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {n_base / 1e6:.0f}M parameters, "
          f"{4 * n_base / 2**20:,.0f} MiB; 2 processes x 1 thread; batch {a.batch} x accumulation {a.accum}, cut at "
          f"{a.seq} tokens; {a.rounds} alternating rounds of {a.steps} steps, the first {a.warmup} of each left out\n")
    print("| mode | base MiB per process | vs DDP | peak RSS MiB per process | vs DDP | step s (median) | vs DDP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        print(f"| {m} | {base[m] / 2**20:,.0f} | {base[m] / base[ddp]:.2f}x | {max(rss[m]):,.0f} | "
              f"{max(rss[m]) / max(rss[ddp]):.2f}x | {statistics.median(step[m]):.2f} | "
              f"{statistics.median(step[m]) / statistics.median(step[ddp]):.2f}x |")


if __name__ == "__main__":
    main()
