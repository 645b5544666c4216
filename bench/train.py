"""
bench/train.py -- train.py's training step against a plain `transformers` + `peft` loop, side by side.

Same random Llama checkpoint (written by transformers), same instruction-style data (prompt masked,
variable lengths, cut at --seq), same global batch (batch x accumulation), LoRA r on all seven projections,
AdamW, gradient clipping, fp32, CPU. Each contender runs in its own process (so peak RSS is its own);
tokens/s counts real (non-padding) trained positions, median over the steps after --warmup.
Rows:
  train.py                       the real script (`python train.py --adapter lora ...`), its metrics.jsonl
  peft loop, shuffled batches    the usual loop: random order, micro-batches padded to their longest
  peft loop, train.py's batches  the same loop fed exactly train.py's micro-batches (length-sorted within
                                 each global batch): isolates the model/adapter implementation
Run:  python -m bench train [--steps 8 --hidden 384 --layers 6 --vocab 32000 --seq 256 --batch 4 --accum 2]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import REPO  # the repository root (train.py)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(argv):
    p = argparse.ArgumentParser(description="train.py vs transformers+peft, tokens/s and peak memory")
    p.add_argument("--steps", type=int, default=8)       # optimizer steps per contender
    p.add_argument("--warmup", type=int, default=2)      # first steps of each run left out of the median
    p.add_argument("--rounds", type=int, default=2)      # alternating runs of each contender
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)       # cutoff: tokens per example at most
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)    # OMP_NUM_THREADS of every contender; 0 = torch's default
    p.add_argument("--who", default="")                  # internal: run one contender in this process
    p.add_argument("--dir", default="")
    p.add_argument("--order", default="shuffled")
    return p.parse_args(argv)


def setup(a, d):
    """Random Llama checkpoint + tokenizer in d/model, instruction-style data in d/data (CONTRACT format)."""
    import transformers
    sys.path.insert(0, str(REPO))
    from conftest import write_tokenizer
    from model import Tokenizer
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq, 512),
                                   rope_theta=500000.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d / "model"))
    write_tokenizer(d / "model")
    tok = Tokenizer.from_pretrained(d / "model")
    rng = np.random.default_rng(0)
    (d / "data").mkdir()
    toks, masks, offs = [], [], [0]
    for _ in range(a.examples):  # prompt 16..60% of the cutoff, response 10..40%: lengths spread over the range
        P, R = rng.integers(a.seq * 16 // 100, a.seq * 60 // 100), rng.integers(a.seq // 10, a.seq * 40 // 100)
        ids = rng.integers(0, tok.n_vocab - 300, size=P + R)  # ordinary tokens
        toks += list(ids)
        masks += [0] * P + [1] * R
        offs.append(len(toks))
    np.array(toks, np.uint32).tofile(d / "data" / "train.bin")
    np.array(masks, np.uint8).tofile(d / "data" / "train.mask.bin")
    np.save(d / "data" / "train.idx.npy", np.array(offs, np.int64))
    for name, data in (("val.bin", b""), ("val.mask.bin", b"")):  # an empty val split: no evaluation
        (d / "data" / name).write_bytes(data)
    np.save(d / "data" / "val.idx.npy", np.zeros(1, np.int64))
    (d / "data" / "meta.json").write_text(json.dumps({
        "format": "nanomasa-sft-v1", "tokenizer": tok.fingerprint, "vocab_size": tok.n_vocab, "cutoff": a.seq,
        "template": "bench", "recipe": "bench", "splits": {"train": {"examples": a.examples, "tokens": len(toks)},
                                                             "val": {"examples": 0, "tokens": 0}},
        "tasks": None, "n_cut": 0, "n_malformed": 0}))


def peft_loop(a):
    """The plain loop a user writes with transformers + peft; prints per-step tokens and seconds as JSON."""
    import transformers
    from peft import LoraConfig, get_peft_model
    sys.path.insert(0, str(REPO))
    import train  # only its data reader and, for --order sorted, its batch order
    d = Path(a.dir)
    split = train.Split(d / "data", "train", a.seq)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d / "model"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5)
    G = a.batch * a.accum
    rng = np.random.default_rng(0)
    perm = rng.permutation(split.n)
    steps = []
    for it in range(a.steps):
        t0 = time.time()
        if a.order == "sorted":
            ids = train.global_batch(it, split, G, 0, split.n // G)
        else:
            ids = perm[it * G:(it + 1) * G]
        for k in range(a.accum):
            mids = ids[k * a.batch:(k + 1) * a.batch]
            L = split.lens[mids]
            T = int(L.max())
            input_ids = torch.zeros(len(mids), T, dtype=torch.long)
            labels = torch.full((len(mids), T), -100, dtype=torch.long)
            attn = torch.zeros(len(mids), T, dtype=torch.long)
            for b, i in enumerate(mids):  # the usual collator: full example, labels = response tokens
                s, n = split.offsets[i], L[b]
                t = torch.from_numpy(split.tokens[s:s + n].astype(np.int64))
                m = torch.from_numpy(split.mask[s:s + n].astype(bool))
                input_ids[b, :n], attn[b, :n] = t, 1
                labels[b, :n] = torch.where(m, t, -100)
            loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"tokens": int(split.lens[ids].sum()) - len(ids), "step_s": time.time() - t0})
    print(json.dumps(steps))


def run(cmd, log, env=None):
    """Run cmd in a child process; return its peak RSS in MiB (from wait4, so only that child)."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed:\n{Path(log).read_text()[-2000:]}")
    return ru.ru_maxrss / 1024


def main(argv=None):
    a = parse(argv)
    if a.who == "peft":
        return peft_loop(a)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        setup(a, d)
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
        common = ["--steps", a.steps, "--seq", a.seq, "--batch", a.batch, "--accum", a.accum, "--r", a.r, "--dir", d]
        names = ["peft loop, shuffled batches", "peft loop, train.py's batches", "train.py"]
        tps, rss = {n: [] for n in names}, {n: [] for n in names}
        for _ in range(a.rounds):  # contenders alternate, so a change in machine load hits them alike
            for order, name in (("shuffled", names[0]), ("sorted", names[1])):
                rss[name].append(run([sys.executable, "-m", "bench.train", "--who", "peft", "--order", order,
                                      *map(str, common)], d / "peft.log", env))
                steps = json.loads(Path(d / "peft.log").read_text().strip().splitlines()[-1])[a.warmup:]
                tps[name] += [s["tokens"] / s["step_s"] for s in steps]
            shutil.rmtree(d / "out", ignore_errors=True)
            rss[names[2]].append(run([
                sys.executable, "train.py", "--adapter", "lora", "--r", str(a.r), "--alpha", "16", "--model", d / "model",
                "--data", d / "data", "--out", d / "out", "--batch_size", str(a.batch), "--grad_accum", str(a.accum),
                "--cutoff", str(a.seq), "--max_steps", str(a.steps), "--eval_every", "0", "--save_every", "0",
                "--dtype", "fp32", "--device", "cpu"], d / "train.log", env))
            recs = [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines()]
            tps[names[2]] += [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][a.warmup:]
        rows = [(n, statistics.median(tps[n]), max(tps[n]), max(rss[n])) for n in names]
    ours = rows[-1]
    print(f"\nLoRA r={a.r}, all seven projections, fp32 on CPU ({os.cpu_count()} cores, torch {torch.__version__}); "
          f"Llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; {a.examples} examples cut at {a.seq} tokens; "
          f"batch {a.batch} x accumulation {a.accum}; {a.threads or torch.get_num_threads()} thread(s); {a.rounds} alternating rounds of {a.steps} steps, "
          f"the first {a.warmup} of each left out\n")
    print("| loop | tokens/s (median) | tokens/s (best step) | peak RSS (MiB) | train.py speed-up (median) | train.py memory ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, med, best, mem in rows:
        print(f"| {name} | {med:,.0f} | {best:,.0f} | {mem:,.0f} | {ours[1] / med:.2f}x | {ours[3] / mem:.2f}x |")

if __name__ == "__main__":
    main()
