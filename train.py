"""
train.py -- fine-tune a LLaMA-family model with a parameter-efficient adapter (MASA, LoRA, DoRA, ...),
from one CPU process to several GPUs under torchrun. One file, read top to bottom (nanoGPT's train.py).

Its order: config, data, helpers (the schedule, batches, FLOPs, flag checks), the run (setup, the loop, the
outputs), main. The run folder and its checkpoint are in checkpoint.py; FSDP2 sharding (--fsdp) in fsdp.py.

Defaults are the MASA paper's recipe (Dong et al., 2025; SPEC.md "Training recipe"): AdamW, lr 5e-5,
cosine schedule with warmup, batch 8 x gradient accumulation 8, 5 epochs, cutoff 1024 tokens, fp16
mixed precision on a GPU. The data is the token/mask files written by prepare_data.py (its 10%
validation split is evaluated every --eval_every steps).

Run:
  python train.py --adapter masa --model DIR --data DIR --out DIR                       # one process
  torchrun --nproc_per_node=2 train.py -- --adapter masa --model DIR --data DIR --out DIR  # DDP
  torchrun --nproc_per_node=2 train.py -- --fsdp --adapter masa ...  # FSDP2: base and adapter sharded (docs/training.md)
  python train.py ... --out DIR --resume                    # continue a killed or stopped run exactly
Writes OUT/adapter.safetensors + adapter.json (adapters.py format), OUT/ckpt.pt (adapter, optimizer,
scaler, step, RNG: resumable), OUT/metrics.jsonl (every logged number), OUT/run.json (the settings).
Task-gated adapters (--adapter moelora / mtllora) need multi-task data (meta.json "tasks"): each micro-batch's
task ids are set before its forward, and the task names are saved in adapter.json. LoRAMoE's balance loss
(--loramoe_beta > 0) is added to the loss and logged as aux_loss.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import adapters
# TrainError is defined with the run folder's checks; train.TrainError stays the error of train's API
from checkpoint import (RUN_FILES, OutClaim, TrainError, check_paths, check_same_run, load_checkpoint,
                        save_hf_checkpoint, sweep_tmp, trim_metrics, write_checkpoint)
from fsdp import (fsdp_skeleton, full_state, gather_whole, resident_base_bytes, shard_like, shard_model,
                  shard_optimizer_state)
from model import (ArgParser, ModelConfig, Tokenizer, Transformer, one_line_errors, read_json,
                   weights_fingerprint, write_atomic)

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    model: str = ""              # Hugging Face checkpoint folder (config.json, safetensors, tokenizer)
    data: str = ""               # folder written by prepare_data.py (meta.json, train.*, val.*)
    out: str = "out"             # run folder: ckpt.pt, metrics.jsonl, run.json, adapter.safetensors/json
    resume: bool = False         # continue the run saved in OUT/ckpt.pt (same settings required)
    overwrite: bool = False      # replace the run (and a --merge_out checkpoint) already in OUT; never needed otherwise
    # optimisation: the MASA recipe (SPEC.md)
    epochs: float = 5.0          # passes over the train split (each drops its last partial global batch)
    max_steps: int = 0           # optimizer steps of the schedule; 0 = epochs x steps per epoch
    stop_after: int = 0          # end this invocation after this step (checkpoint saved, schedule kept); 0 = run to the end
    batch_size: int = 8          # sequences per micro-batch, per process
    grad_accum: int = 8          # micro-batches per optimizer step over all processes: global batch = batch_size x grad_accum
    lr: float = 5e-5             # peak AdamW learning rate
    min_lr: float = 0.0          # learning rate at the end of the cosine (0, as Hugging Face's cosine schedule)
    warmup_ratio: float = 0.03   # fraction of the steps with linear warmup (the paper does not say; Alpaca's 0.03)
    weight_decay: float = 0.0    # AdamW decoupled weight decay (Hugging Face Trainer's default)
    beta1: float = 0.9           # AdamW beta1
    beta2: float = 0.999         # AdamW beta2
    grad_clip: float = 1.0       # clip the global gradient norm to this; 0 = no clipping
    cutoff: int = 1024           # tokens per example at most (prompt + response); longer ones are cut
    seed: int = 0                # data order and dropout; on the command line also the adapter's init seed
    # precision and speed
    dtype: str = "auto"          # auto | fp32 | bf16 | fp16; auto = fp16 on CUDA (the paper's), fp32 on CPU
    device: str = "auto"         # auto | cpu | cuda; under torchrun each process takes cuda:LOCAL_RANK
    init_scale: float = 65536.0  # fp16 GradScaler's first loss scale (2^16, PyTorch's default)
    grad_checkpoint: bool = False  # recompute each block's activations in backward (non-reentrant)
    compile: bool = False        # torch.compile the model
    fsdp: bool = False           # torchrun only: shard the frozen base and the adapter over the processes (FSDP2) instead of DDP's whole copies
    # evaluation, logging, checkpoints
    eval_every: int = 100        # evaluate the val split every this many steps (and at start and end); 0 = never
    eval_examples: int = 0       # val examples per evaluation; 0 = the whole split
    save_every: int = 200        # write OUT/ckpt.pt every this many steps (and at the end)
    merge_out: str = ""          # also write a merged Hugging Face checkpoint here (mergeable adapters only)
    peak_tflops: float = 0.0     # per-GPU peak for MFU; 0 = look the GPU up in PEAK_TFLOPS


# Settings that may change when resuming: they do not change the trained weights.
RUNTIME_FIELDS = {"model", "data", "out", "resume", "overwrite", "stop_after", "device", "grad_checkpoint", "compile",
                  "eval_every", "eval_examples", "save_every", "merge_out", "peak_tflops",
                  "fsdp"}  # fsdp: sharding changes where tensors live, not their values (resume either way)

# Dense (no sparsity) tensor-core peak TFLOPS per GPU from NVIDIA's data sheets: (fp16/bf16, tf32).
# The first name contained in torch.cuda.get_device_name() wins. --peak_tflops overrides.
PEAK_TFLOPS = [
    ("GH200", 989.4, 494.7), ("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7), ("B200", 2250.0, 1100.0), ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0), ("A10", 125.0, 62.5), ("RTX 4090", 165.2, 82.6), ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7), ("T4", 65.0, 8.1),
]


# -----------------------------------------------------------------------------
# data: the files prepare_data.py writes (docs/data.md, "Data format")
#   DIR/{split}.bin uint32 tokens of all examples, DIR/{split}.mask.bin uint8 (1 = response token),
#   DIR/{split}.idx.npy int64 offsets (example i = [idx[i], idx[i+1])). Each example holds BOS, the
#   templated prompt, the response and EOS. Training on tokens t with mask m: input t[:-1],
#   targets where(m[1:], t[1:], -100), so the loss falls on the response (and EOS) only.
#   Multi-task recipes add DIR/{split}.task.npy int32 (task id of each example, names in meta.json
#   "tasks"): task-gated adapters (MoELoRA, MTL-LoRA) get the ids of each micro-batch before its forward.


def read_meta(data_dir):
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise TrainError(f"data folder {data_dir} has no meta.json: write it with prepare_data.py "
                         f"(python prepare_data.py RECIPE --model MODEL --out {data_dir}) or fix --data")
    fix = f"re-run prepare_data.py to rewrite {data_dir}"
    meta = read_json(meta_path, fix=fix)
    if meta.get("format") != "nanomasa-sft-v1":
        raise TrainError(f"{meta_path} has format {meta.get('format')!r}, not 'nanomasa-sft-v1': {fix}")
    tasks, vocab = meta.get("tasks"), meta.get("vocab_size", 0)
    if (not isinstance(meta.get("tokenizer"), (str, type(None))) or not isinstance(vocab, int) or isinstance(vocab, bool)
            or not isinstance(meta.get("splits", {}), dict)
            or not (tasks is None or isinstance(tasks, list) and all(isinstance(t, str) for t in tasks))):
        raise TrainError(f"{meta_path}: a field has the wrong type (tokenizer: string, vocab_size: integer, splits: "
                         f"object, tasks: list of names or null): {fix}")
    return meta


class Split:
    """One split memory-mapped: tokens, response mask, example offsets; lengths cut at `cutoff`."""

    def __init__(self, data_dir, name, cutoff):
        d = Path(data_dir)
        for suffix in (".bin", ".mask.bin", ".idx.npy"):
            if not (d / f"{name}{suffix}").is_file():
                raise TrainError(f"{d / (name + suffix)} is missing: re-run prepare_data.py to rewrite {d}")
        fix = f"re-run prepare_data.py to rewrite {d}"
        self.offsets = load_ints(d / f"{name}.idx.npy", fix)                           # (n+1,) int64
        self.tokens = memmap(d / f"{name}.bin", np.uint32, fix)                        # (total,)
        self.mask = memmap(d / f"{name}.mask.bin", np.uint8, fix)                      # (total,)
        if len(self.offsets) == 0 or self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
            raise TrainError(f"{d / (name + '.idx.npy')}: offsets must start at 0 and never decrease: {fix}")
        if len(self.tokens) != self.offsets[-1] or len(self.mask) != len(self.tokens):
            raise TrainError(f"{d}/{name}.* disagree ({len(self.tokens)} tokens, {len(self.mask)} mask bytes, "
                             f"offsets end at {self.offsets[-1]}): {fix}")
        if len(self.mask) and self.mask.max() > 1:  # any other byte would silently train on nothing (or on all)
            raise TrainError(f"{d / (name + '.mask.bin')}: mask bytes must be 0 (prompt) or 1 (response), found "
                             f"{int(self.mask.max())}: {fix}")
        self.n = len(self.offsets) - 1
        self.tasks = load_ints(d / f"{name}.task.npy", fix) if (d / f"{name}.task.npy").is_file() else None  # (n,) int32
        if self.tasks is not None and len(self.tasks) != self.n:
            raise TrainError(f"{d}/{name}.task.npy has {len(self.tasks)} task ids for {self.n} examples: "
                             f"re-run prepare_data.py")
        full = np.diff(self.offsets)                                                  # (n,) tokens per example
        self.lens = np.minimum(full, cutoff)                                          # (n,) after the cutoff
        # Targets per example: response tokens at positions 1..len-1. Summed per example with reduceat
        # (no token-sized temporary); the few examples longer than the cutoff are recounted one by one.
        start, nonempty = self.offsets[:-1], full > 0
        self.n_targets = np.zeros(self.n, np.int64)                                   # (n,)
        if nonempty.any():
            self.n_targets[nonempty] = np.add.reduceat(self.mask, start[nonempty], dtype=np.int64) - self.mask[start[nonempty]]
        for i in np.nonzero(full > self.lens)[0]:
            self.n_targets[i] = self.mask[start[i] + 1:start[i] + self.lens[i]].sum(dtype=np.int64)

    def batch(self, ids):
        """Examples `ids` -> x (B, T) inputs, y (B, T) targets; right-padded to the longest of them.
        Padding sits after every real token, so causal attention never lets a real token see it and
        no attention mask is needed; its targets are -100."""
        T = max(int(self.lens[ids].max()) - 1, 1)
        x = np.zeros((len(ids), T), np.int64)
        y = np.full((len(ids), T), -100, np.int64)
        for b, i in enumerate(ids):
            s, L = self.offsets[i], self.lens[i]
            if L < 2:
                continue  # nothing to predict: a row of padding
            t = self.tokens[s:s + L].astype(np.int64)
            m = self.mask[s:s + L]
            x[b, :L - 1] = t[:-1]
            y[b, :L - 1] = np.where(m[1:] == 1, t[1:], -100)
        return torch.from_numpy(x), torch.from_numpy(y)

    def task_ids(self, ids):
        """Examples `ids` -> (B,) long task ids, in the order of batch(ids)."""
        return torch.from_numpy(self.tasks[ids].astype(np.int64))


def memmap(path, dtype, fix):
    size = path.stat().st_size
    if size % np.dtype(dtype).itemsize:
        raise TrainError(f"{path}: {size} bytes, not a whole number of {np.dtype(dtype).name} values (a truncated "
                         f"copy?): {fix}")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def load_ints(path, fix):
    """A 1-D integer .npy array (never unpickled), or one line naming the file."""
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TrainError(f"{path}: not a readable .npy array ({' '.join(str(e).split())[:80]}): {fix}") from None
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise TrainError(f"{path}: holds a {a.dtype} array of shape {a.shape}, not 1-D integers: {fix}")
    return a


def data_fingerprint(data_dir):
    """sha256 of every split file's bytes (tokens, masks, offsets, task ids): --resume refuses other data with
    the same example counts. Read in 16 MiB chunks (speed in bench/BENCHMARKS.md)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for suffix in (".bin", ".mask.bin", ".idx.npy", ".task.npy"):
            f = Path(data_dir) / f"{split}{suffix}"
            if f.is_file():
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
    return h.hexdigest()[:16]


def check_data(meta, data_dir, model_dir, mcfg, train, val=None):
    """The data must be tokenised with the model's own tokenizer."""
    try:
        tok = Tokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot read the tokenizer of {model_dir} ({e}); the data's tokenizer cannot be "
                         f"checked: put the tokenizer files prepare_data.py used into {model_dir}") from None
    if meta.get("tokenizer") != tok.fingerprint:
        raise TrainError(f"data {data_dir} was tokenised with tokenizer {meta.get('tokenizer')!r}, but "
                         f"{model_dir} has tokenizer {tok.fingerprint!r}: re-run prepare_data.py with --model {model_dir}")
    top = max((int(s.tokens.max()) for s in (train, val) if s is not None and len(s.tokens)), default=-1)
    if meta.get("vocab_size", 0) > mcfg.vocab_size or top >= mcfg.vocab_size:
        raise TrainError(f"data {data_dir} has token ids up to {max(top, meta.get('vocab_size', 0) - 1)} but "
                         f"{model_dir} embeds only {mcfg.vocab_size}: re-run prepare_data.py with --model {model_dir}")


# -----------------------------------------------------------------------------
# helpers


def get_lr(it, cfg, total_steps):
    """Learning rate of optimizer step `it` (from 0): linear warmup from 0 over ceil(warmup_ratio · steps),
    then a half cosine down to min_lr. With min_lr = 0 this is Hugging Face's
    get_cosine_schedule_with_warmup under TrainingArguments(warmup_ratio=...), the recipe's scheduler."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if it < warmup:
        return cfg.lr * it / warmup
    progress = min((it - warmup) / max(1, total_steps - warmup), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch(it, split, G, seed, steps_per_epoch):
    """Example ids of optimizer step `it`, longest first. Epoch e is a permutation seeded by (seed, e) and
    its step k takes examples [k·G, (k+1)·G) (the last partial batch is dropped): a pure function of the
    step, so every process, and a resumed run, reads exactly what a single uninterrupted run reads.
    Sorting by length makes micro-batches pad less; the loss is normalised over the whole global batch
    (see the loop), so the gradient does not depend on how the batch is cut into micro-batches."""
    epoch, k = divmod(it, steps_per_epoch)
    ids = np.random.default_rng([seed, epoch]).permutation(split.n)[k * G:(k + 1) * G]
    return ids[np.argsort(-split.lens[ids], kind="stable")]


def micro_batches(ids, batch_size, rank, world):
    """The micro-batches of global batch `ids` that process `rank` runs: numbers rank, rank + world, ...
    (dealt round-robin, so each process gets a similar mix of long and short ones)."""
    return [ids[j * batch_size:(j + 1) * batch_size] for j in range(rank, len(ids) // batch_size, world)]


def flops_per_step(mcfg, n_body, n_head, n_adapter, tokens, n_response, sum_t2, base_grad=False):
    """Model FLOPs of one optimizer step over real (non-padding) tokens, of which n_response carry a target.
    Recomputation (gradient checkpointing) is not counted: MFU as in PaLM (Chowdhery et al. 2022, App. B).
      frozen base matmuls: 2·N per token forward + 2·N backward (input gradients only: a frozen weight
        needs no weight gradient). lm_head runs on the response rows alone (the model's
        return_logits=False path)                  -> 4·N_body·tokens + 4·N_head·n_response
      adapter matmuls: 2·N_ad forward + 2·N_ad input gradient + 2·N_ad weight gradient -> 6·N_ad·tokens,
        N_ad = sum over adapted linears of r·(d_in + d_out) (a rank-r LoRA; MASA agg=sum costs the same
        once its bank is summed; routers and DoRA's norms are left out)
      attention QKᵀ and PV: 2·2·L·H·d_head·t²/2 forward for a causal sequence of t tokens, backward
        twice that                                                  -> 6·L·H·d_head·Σ t²
    N_body counts the nn.Linear weights of the blocks, N_head lm_head's; embeddings are lookups.
    base_grad (--adapter none, every weight trains): the base's weight gradients too, 6·N instead of 4·N."""
    attn = 6 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * sum_t2
    k = 6 if base_grad else 4
    return k * n_body * tokens + k * n_head * n_response + 6 * n_adapter * tokens + attn


def peak_flops(device, dtype, override_tflops):
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None  # no MFU on a CPU: its peak depends on SIMD width, clocks and cores
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_TFLOPS:
        if key in name:
            return (tf32 if dtype == torch.float32 else half) * 1e12
    return None


def parse_args(argv):
    """Flags from TrainConfig, then AdapterConfig (adapters.py's names); --seed is one flag for both."""
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    adapters.add_dataclass_args(p, TrainConfig)
    adapters.add_dataclass_args(p, adapters.AdapterConfig)
    flag = p._option_string_actions["--adapter"]  # nanoMASA's train.py trains the recipe's method by default
    flag.default, flag.help = "masa", flag.help.replace(f"(default: {flag.default})", "(default: masa)")
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = p.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `torchrun ... train.py -- --r 8` (see README)
    return adapters.dataclass_from_args(TrainConfig, ns), adapters.dataclass_from_args(adapters.AdapterConfig, ns)


def check_ranges(cfg):
    """Flags outside their range would run and save an untrained adapter with exit status 0: refuse them."""
    finite = math.isfinite
    rules = [("epochs", cfg.epochs > 0 and finite(cfg.epochs), "a number > 0"), ("max_steps", cfg.max_steps >= 0, ">= 0"),
             ("stop_after", cfg.stop_after >= 0, ">= 0"), ("save_every", cfg.save_every >= 0, ">= 0"),
             ("eval_every", cfg.eval_every >= 0, ">= 0"), ("eval_examples", cfg.eval_examples >= 0, ">= 0"),
             ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"), ("min_lr", 0 <= cfg.min_lr <= cfg.lr, "in [0, --lr]"),
             ("weight_decay", cfg.weight_decay >= 0 and finite(cfg.weight_decay), ">= 0"),
             ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
             ("grad_clip", cfg.grad_clip >= 0, ">= 0"), ("init_scale", cfg.init_scale > 0 and finite(cfg.init_scale), "> 0"),
             ("peak_tflops", cfg.peak_tflops >= 0, ">= 0"), ("lr", finite(cfg.lr), "finite")]
    for name, ok, want in rules:
        if not ok:
            raise TrainError(f"--{name} {getattr(cfg, name)}: must be {want}")


def check_fsdp(cfg, acfg, launched):
    """What --fsdp cannot do, refused in one line before anything heavy."""
    if not launched:
        raise TrainError("--fsdp: shards over the processes torchrun starts, and this is one process: launch "
                         "torchrun --nproc_per_node=N train.py -- --fsdp ... (docs/training.md), or drop --fsdp")
    if acfg.adapter == "none":
        raise TrainError("--fsdp: --adapter none trains every weight and writes the whole model from one process; "
                         "--fsdp shards adapters over a frozen base: drop --fsdp (DDP)")
    if acfg.adapter == "cola" and acfg.cola_init == "svd":
        raise TrainError("--fsdp: cola's svd init rewrites each frozen weight from its SVD, which needs the whole "
                         "weight in one process: use --cola_init lora, or drop --fsdp (DDP)")
    if acfg.adapter == "prompt_tuning" and acfg.prompt_init == "vocab":
        raise TrainError("--fsdp: prompt_tuning's vocab init copies rows of the whole embedding table, which no "
                         "process holds under --fsdp: use --prompt_init random, or drop --fsdp (DDP)")
    if cfg.merge_out:
        raise TrainError("--merge_out: a merged checkpoint needs every whole base weight in one process, which --fsdp "
                         "never holds: drop --merge_out and merge OUT's adapter afterwards (adapters.export_merged)")


def verify_identical(params, device):
    """Every process must hold the same adapter at step 0 (seeded init, then DDP's broadcast)."""
    s = torch.stack([p.detach().double().sum() for p in params]).to(device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainError("adapter parameters differ across processes at step 0: report this as a bug")


# -----------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, acfg):
    """The run (Python API of the command line): returns the trained model. OUT is held by this run until it
    returns or raises; a KeyboardInterrupt leaves with .step and .saved_step set, for the one-line report."""
    claim = OutClaim()
    try:
        return _train(cfg, acfg, claim)
    except KeyboardInterrupt as e:
        e.step, e.saved_step, e.out = claim.step, claim.saved_step, cfg.out
        raise
    finally:
        claim.release()


def _train(cfg: TrainConfig, acfg, claim):
    # --- processes and devices: DDP when launched by torchrun (RANK/LOCAL_RANK/WORLD_SIZE set)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                               int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    master = rank == 0  # the one process that prints and writes files
    dev_type = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if dev_type not in ("cpu", "cuda") or (dev_type == "cuda" and not torch.cuda.is_available()):
        raise TrainError(f"--device {cfg.device}: use auto, cpu or cuda (cuda needs a GPU build of torch)")
    device = torch.device(f"cuda:{local_rank}" if dev_type == "cuda" else "cpu")
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise TrainError(f"--dtype {cfg.dtype}: use auto, fp32, bf16 or fp16")
    # CPUs without native bf16 run bf16/fp16 autocast ~40x slower than fp32: never chosen silently.
    dtype_name = ("fp16" if dev_type == "cuda" else "fp32") if cfg.dtype == "auto" else cfg.dtype
    ptdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if cfg.grad_accum % world:
        raise TrainError(f"--grad_accum {cfg.grad_accum} micro-batches do not divide across {world} processes: "
                         f"use a multiple of {world} (the global batch is batch_size x grad_accum)")
    if min(cfg.batch_size, cfg.grad_accum, cfg.cutoff - 1) < 1 or not cfg.lr > 0:
        raise TrainError("--batch_size and --grad_accum must be >= 1, --cutoff >= 2 and --lr > 0")
    check_ranges(cfg)
    accum = cfg.grad_accum // world  # micro-steps per process per optimizer step

    # --- inputs, checked before anything heavy
    model_dir, out = Path(cfg.model), Path(cfg.out)
    if not (model_dir / "config.json").is_file():
        raise TrainError(f"model folder {cfg.model or '(none)'} has no config.json: pass --model a Hugging Face checkpoint folder")
    mcfg = ModelConfig.from_hf(model_dir)
    meta = read_meta(cfg.data)
    train_split, val_split = Split(cfg.data, "train", cfg.cutoff), None
    if train_split.n_targets.sum() == 0:  # e.g. --cutoff below every prompt: nothing to learn, refuse loudly
        raise TrainError(f"no response tokens to train on in {cfg.data} at --cutoff {cfg.cutoff} "
                         f"({train_split.n} examples, all prompt): raise --cutoff or check the data")
    if (Path(cfg.data) / "val.idx.npy").is_file():
        val_split = Split(cfg.data, "val", cfg.cutoff)
    check_data(meta, cfg.data, model_dir, mcfg, train_split, val_split)
    G = cfg.batch_size * cfg.grad_accum  # global batch, sequences
    steps_per_epoch = train_split.n // G
    if steps_per_epoch == 0:
        raise TrainError(f"the train split has {train_split.n} examples, fewer than one global batch of {G}: "
                         f"lower --batch_size or --grad_accum")
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    full = acfg.adapter == "none"  # full-parameter training (e.g. pretraining the demo's base): no adapter
    # Task-gated adapters (MoELoRA, MTL-LoRA) need a task id per example: T and the task names come from the
    # data, and the names are saved with the adapter so that eval_mmlu.py can map subjects to ids.
    gated = acfg.adapter in adapters.TASK_GATED
    tasks = meta.get("tasks") if gated else None
    if gated:
        if not tasks or train_split.tasks is None or (val_split is not None and val_split.tasks is None):
            raise TrainError(f"--adapter {acfg.adapter} needs a task id per example, but {cfg.data} has no tasks "
                             f"(meta.json tasks / *.task.npy): prepare a multi-task recipe (e.g. synthetic, or jsonl "
                             f"with --task_field) or choose a non-task-gated adapter")
        if acfg.num_tasks is None:
            acfg.num_tasks = len(tasks)
        elif acfg.num_tasks != len(tasks):
            raise TrainError(f"--num_tasks {acfg.num_tasks} but {cfg.data} has {len(tasks)} tasks ({', '.join(tasks)}): "
                             f"drop --num_tasks (it is taken from the data)")
        for name, sp in (("train", train_split), ("val", val_split)):
            if sp is not None and len(sp.tasks) and not 0 <= sp.tasks.min() <= sp.tasks.max() < len(tasks):
                raise TrainError(f"{Path(cfg.data) / (name + '.task.npy')}: task ids {sp.tasks.min()}..{sp.tasks.max()} "
                                 f"outside 0..{len(tasks) - 1} (meta.json names {len(tasks)} tasks): re-run prepare_data.py")
    if not full:
        acfg.validate()
    if full and cfg.merge_out:
        raise TrainError("--merge_out is for adapters: with --adapter none the trained model is written to OUT/model")
    check_paths(cfg, model_dir, out)
    if cfg.fsdp:
        check_fsdp(cfg, acfg, launched=ddp)
    # what the weights depend on: settings, the base's shapes AND content, the tokenizer, the data's content
    run_id = {"train": {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS},
              "adapter": asdict(acfg), "model": mcfg.fingerprint(), "tokenizer": meta.get("tokenizer"),
              "data": {s: meta.get("splits", {}).get(s) for s in ("train", "val")},
              "base_weights": weights_fingerprint(model_dir), "data_content": data_fingerprint(cfg.data)}
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    if master:  # this run holds OUT until it ends (two runs into one folder would overwrite each other)
        claim.take(out)
        sweep_tmp(out)
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"--resume: {ckpt_path} does not exist: drop --resume to start fresh, or point --out at the run")
        ckpt = load_checkpoint(ckpt_path)
        check_same_run(ckpt["run"], run_id, ckpt_path)
        claim.saved_step = ckpt["step"]
    elif made := [f for f in RUN_FILES if (out / f).exists()]:
        if not cfg.overwrite:
            hint = "pass --resume to continue that run, " if "ckpt.pt" in made else ""
            raise TrainError(f"{out} already holds a run ({', '.join(made)}): {hint}pass --overwrite to replace it, "
                             f"or choose another --out")
        if master:
            for f in made:
                shutil.rmtree(out / f) if (out / f).is_dir() else (out / f).unlink()

    if ddp:  # after the checks, so bad input fails fast on every process with the same message
        if dev_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if dev_type == "cuda" else "gloo")
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (counted as tf32 in MFU)
        torch.backends.cudnn.allow_tf32 = True

    # --- model: frozen base in the compute dtype, adapter parameters in fp32 (adapters.py keeps them so).
    # With --adapter none every weight trains, so the weights are fp32 masters and autocast does the rest.
    if cfg.fsdp:  # no process ever holds the whole base: zero-byte weights now, each its own slices in shard_model
        model = fsdp_skeleton(model_dir, ptdtype, device)
    else:
        model = Transformer.from_pretrained(model_dir, dtype=torch.float32 if full else ptdtype, device=device)
    n_body = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, nn.Linear))  # all but lm_head
    n_head = model.lm_head.weight.numel()
    n_adapter = 0 if full else sum(acfg.r * (m.in_features + m.out_features) for name, m in model.named_modules()
                                   if isinstance(m, nn.Linear) and name.split(".")[-1] in acfg.target_list)
    if full:
        params = list(model.parameters())  # tied embeddings appear once
    else:
        # Freezes the base and returns the trainable parameters, each once. The init is drawn from a CPU
        # generator seeded by acfg.seed, so every process builds the same adapter.
        params = adapters.inject(model, acfg, tasks=tasks)
    if cfg.merge_out:  # refuse now rather than after training
        why = next((m.not_mergeable for m in model.modules() if getattr(m, "not_mergeable", None)), None)
        if gated:  # one merged checkpoint per task: adapters.export_merged(model, dir, task=t) after training
            why = f"{acfg.adapter} is task-gated and merges one task at a time (adapters.export_merged(model, dir, task=t))"
        if why:
            raise TrainError(f"--merge_out: {why}; or drop --merge_out (OUT gets the adapter either way)")
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [names[id(p)] for p in params]
    n_trainable = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # tied weights once
    model.gradient_checkpointing = cfg.grad_checkpoint  # blocks recomputed in backward (non-reentrant)
    raw_model = model
    if cfg.fsdp:
        params = shard_model(model, model_dir, device, param_names)  # the sharded parameters replace the whole ones
    elif ddp:
        # Frozen weights are loaded identically by every process: keep them out of DDP's start-up
        # broadcast (gigabytes for an 8B base). DDP broadcasts the adapter from rank 0 and reduces
        # only parameters that require grad; a shared MASA bank is one parameter, reduced once.
        # Buffers (RoPE's inv_freq) are computed identically everywhere too: no per-forward broadcast.
        same_everywhere = [n for n, p in model.named_parameters() if not p.requires_grad] + \
            [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, same_everywhere)
        model = DDP(model, device_ids=[local_rank] if dev_type == "cuda" else None)
        verify_identical(params, device)
    if cfg.compile:
        model = torch.compile(model)  # after DDP, so dynamo splits the graph at DDP's buckets

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=dev_type == "cuda")
    scaler = torch.amp.GradScaler(dev_type, init_scale=cfg.init_scale, enabled=ptdtype == torch.float16)
    autocast = torch.autocast(dev_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    torch.manual_seed(cfg.seed + rank)  # dropout differs across processes
    step, saved_step = 0, None
    if ckpt is not None:
        if ckpt["param_names"] != param_names:
            raise TrainError(f"{ckpt_path} holds other adapter parameters than this run builds: resume with the same settings")
        with torch.no_grad():
            for p, v in zip(params, ckpt["params"]):
                p.copy_(shard_like(v, p) if cfg.fsdp else v)
        optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], params) if cfg.fsdp else ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = saved_step = ckpt["step"]
        if ckpt["world_size"] == world:
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if dev_type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        if master:
            trim_metrics(out / "metrics.jsonl", step)

    def log(rec):
        if master:  # strict JSON: a non-finite number is written as null
            rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", lambda f: f.write_text(json.dumps(
            {**run_id, "runtime": {k: getattr(cfg, k) for k in sorted(RUNTIME_FIELDS)}, "world_size": world,
             "dtype": dtype_name, "trainable": n_trainable, "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps}, indent=2)))
        if not cfg.resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        print(f"{acfg.adapter}: {n_trainable:,} trainable parameters "
              f"({100 * n_trainable / (n_frozen + n_trainable):.3f}%); {world} process(es) on "
              f"{dev_type}, {dtype_name}; global batch {G} = {cfg.batch_size} x {cfg.grad_accum}; "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps", flush=True)
    base_bytes = resident_base_bytes(raw_model, device) if cfg.fsdp else None  # a collective: every process
    if not cfg.resume:
        log({"step": 0, "trainable": n_trainable, "frozen": n_frozen, "world_size": world, "dtype": dtype_name,
             "global_batch": G, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
             **({"base_bytes_per_process": base_bytes} if cfg.fsdp else {})})
    peak = peak_flops(device, ptdtype, cfg.peak_tflops)

    def response_loss(m, x, y, t=None):
        """Summed cross-entropy of micro-batch x (B, T) against targets y (B, T). With return_logits=False the
        model runs lm_head and the fp32 cross-entropy only on rows whose target is not -100 (the response):
        prompt and padding logits were never used, and the (B, T, V) logits are never materialised
        (Llama 3: 8 x 1024 x 128256 fp32 = 4.2 GB per micro-batch, twice with their gradient).
        t (B,): the examples' task ids, handed to the task-gated adapter before the forward."""
        if t is not None:
            adapters.set_task(raw_model, t)
        if dev_type == "cuda":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        with autocast:
            _, loss = m(x, y, return_logits=False, reduction="sum")  # 0 (with a graph) if y is all -100
        return loss

    # --- evaluation: mean loss per response token over the val split (or its first eval_examples),
    # longest first, micro-batches dealt round-robin to the processes, sums reduced across them.
    @torch.no_grad()
    def evaluate():
        raw_model.eval()
        n = val_split.n if not cfg.eval_examples else min(cfg.eval_examples, val_split.n)
        ids = np.argsort(-val_split.lens[:n], kind="stable")
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, target count)
        # FSDP: every process runs the same forwards (each gathers weights with the others); past n, a filler without targets
        last = -(-n // (world * cfg.batch_size)) * world * cfg.batch_size if cfg.fsdp else n
        for j in range(rank * cfg.batch_size, last, world * cfg.batch_size):
            part = ids[j:j + cfg.batch_size] if j < n else ids[:1]
            x, y = val_split.batch(part)
            y = y if j < n else torch.full_like(y, -100)
            t = val_split.task_ids(part) if gated else None
            sums[0] += response_loss(raw_model, x, y, t)
            sums[1] += int((y != -100).sum())
        if ddp:
            dist.all_reduce(sums)
        raw_model.train()
        return (sums[0] / sums[1].clamp(min=1)).item()

    def save_checkpoint():
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if dev_type == "cuda" else None}
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        # the same file under FSDP: whole tensors, gathered by every process (a collective), written by one
        whole, opt_state = full_state(params, optimizer) if cfg.fsdp else ([p.detach().cpu() for p in params],
                                                                            optimizer.state_dict())
        if master:
            state = {"step": step, "run": run_id, "world_size": world, "param_names": param_names,
                     "params": whole, "optimizer": opt_state,
                     "scaler": scaler.state_dict(), "rng": rngs}
            write_checkpoint(ckpt_path, state, saved_step)

    do_eval = val_split is not None and val_split.n > 0 and cfg.eval_every > 0
    if master and cfg.eval_every > 0 and not do_eval:
        print(f"note: {cfg.data} has no val examples: no evaluation", flush=True)
    if do_eval and step == 0:
        val = evaluate()
        log({"step": 0, "val_loss": val})
        if master:
            print(f"step 0: val loss {val:.4f}", flush=True)

    # --- training loop
    stop = min(total_steps, cfg.stop_after) if cfg.stop_after else total_steps
    bar = claim.bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    while step < stop:
        t0 = time.time()
        lr = get_lr(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = global_batch(step, train_split, G, cfg.seed, steps_per_epoch)  # (G,) example ids
        n_tgt = max(int(train_split.n_targets[ids].sum()), 1)  # response tokens in the global batch
        loss_sum = torch.zeros(2, device=device)  # (train loss, auxiliary loss) of this process
        for k, mids in enumerate(micro_batches(ids, cfg.batch_size, rank, world)):
            x, y = train_split.batch(mids)  # (B, T) inputs, (B, T) targets, on the CPU
            t = train_split.task_ids(mids) if gated else None  # (B,) task ids for a task-gated adapter
            sync = not ddp or k == accum - 1  # gradients all-reduced on the last micro-step only
            if cfg.fsdp:  # FSDP's no_sync: gradients stay whole and local until the last micro-step
                model.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or cfg.fsdp else model.no_sync()):
                # Sum of token losses / response tokens of the whole global batch: every response token
                # weighs the same however the batch is cut into micro-batches and processes (x world,
                # because DDP averages gradients over processes). This replaces nanoGPT's loss / accum.
                loss = response_loss(model, x, y, t) * (world / n_tgt)
                # LoRAMoE's balance loss (None for the other adapters) is per micro-batch: its mean over the
                # global batch's micro-batches (/ accum here, then DDP's average over processes).
                aux = adapters.aux_loss(raw_model)
                aux = torch.zeros((), device=device) if aux is None else aux / accum
                scaler.scale(loss + aux).backward()
            loss_sum += torch.stack([loss.detach(), aux.detach()])
        if ddp:
            dist.all_reduce(loss_sum)
        scaler.unscale_(optimizer)  # true gradients before clipping (a no-op unless fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = gather_whole(grad_norm)  # under FSDP the norm of the whole gradient, reduced over the shards
        # One host sync per optimizer step, before the update: the loss and gradient norm for the log and
        # the NaN check. A non-finite gradient is an overflow that the fp16 scaler skips; without a
        # scaler it would poison the weights, so it stops the run like a NaN loss.
        (train_loss, aux_loss), gnorm = (loss_sum / world).tolist(), grad_norm.item()
        if not math.isfinite(train_loss) or (not scaler.is_enabled() and not math.isfinite(gnorm)):
            what = f"loss is {train_loss}" if not math.isfinite(train_loss) else f"gradient norm is {gnorm}"
            kept = f"{ckpt_path} (step {saved_step}) is kept" if saved_step is not None else "no checkpoint was written"
            bar.close()
            raise TrainError(f"{what} at step {step + 1}: training stopped, {kept}; lower --lr, or use "
                             f"--dtype bf16/fp32 if fp16 overflows")
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        skipped = scaler.get_scale() < scale
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        tokens = int(train_split.lens[ids].sum()) - len(ids)  # real input tokens of the global batch
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": train_loss, "lr": lr,
               "grad_norm": gnorm, "tokens_per_s": tokens / dt, "step_s": dt}
        if acfg.loramoe_beta:
            rec["aux_loss"] = aux_loss  # β·Σ L_lbc, mean over the micro-batches (not in "loss")
        if peak:
            sum_t2 = float(((train_split.lens[ids] - 1).astype(np.float64) ** 2).sum())
            flops = flops_per_step(mcfg, n_body, n_head, n_adapter, tokens, n_tgt, sum_t2, base_grad=full)
            rec["mfu"] = flops / dt / (peak * world)
        if scaler.is_enabled():
            rec.update(loss_scale=scaler.get_scale(), skipped=skipped)
        log(rec)
        if master:
            if skipped:
                tqdm.write(f"step {step}: fp16 gradients overflowed, step skipped; loss scale {scale:g} -> {scaler.get_scale():g}")
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}",
                            **({"mfu": f"{100 * rec['mfu']:.1f}%"} if peak else {}))
            bar.update(1)
        if do_eval and (step % cfg.eval_every == 0 or step == total_steps):
            val = evaluate()
            log({"step": step, "val_loss": val})
            if master:
                tqdm.write(f"step {step}: val loss {val:.4f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            save_checkpoint()
            saved_step = claim.saved_step = step
        claim.step = step
    bar.close()

    # --- outputs: the adapter in adapters.py's format (or, with --adapter none, the whole model as a
    # Hugging Face checkpoint in OUT/model), and a merged checkpoint when asked
    whole = {n: p for n, p in zip(param_names, full_state(params)[0])} if cfg.fsdp else None  # FSDP: gathered
    if master:
        try:
            if full:
                save_hf_checkpoint(raw_model, model_dir, out / "model")
            else:
                adapters.save_adapter(raw_model, out, tensors=whole)
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk; each file is written whole or not at all
            raise TrainError(f"{out}: saving the {'model' if full else 'adapter'} failed ({' '.join(str(e).split())[:120]}): "
                             f"{ckpt_path} (step {saved_step}) is kept; free disk space and run again with --resume") from None
        print(f"step {step}/{total_steps}: {'model' if full else 'adapter'} saved to {out / 'model' if full else out}" +
              ("" if step == total_steps else f"; continue with --resume --out {out}"), flush=True)
        if cfg.merge_out and step == total_steps:
            adapters.export_merged(raw_model, cfg.merge_out)
            print(f"merged checkpoint written to {cfg.merge_out}", flush=True)
    if ddp:
        dist.barrier()
    return raw_model


# -----------------------------------------------------------------------------
# main: the command line (one error line, or one line on Ctrl-C)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg, acfg = parse_args(argv)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        with one_line_errors(quiet=not rank0, interrupt=False):
            train(cfg, acfg)
    except KeyboardInterrupt as e:  # Ctrl-C: one line saying what is kept and how to go on, not 40 of traceback
        if rank0:
            print(interrupted_line(e, argv), file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def interrupted_line(e, argv):
    step, saved, out = getattr(e, "step", 0), getattr(e, "saved_step", None), getattr(e, "out", "OUT")
    launcher = "torchrun ... train.py" if "RANK" in os.environ else "python train.py"
    if saved is None:
        written = any((Path(out) / f).exists() for f in RUN_FILES)  # then a fresh start must replace them
        again = [a for a in argv if a != "--resume"] + (["--overwrite"] if written and "--overwrite" not in argv else [])
        return (f"error: interrupted (Ctrl-C) at step {step}: no checkpoint was written; start again with: "
                f"{launcher} {shlex.join(again)}")
    again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    return (f"error: interrupted (Ctrl-C) at step {step}: {Path(out) / 'ckpt.pt'} holds step {saved}; continue with: "
            f"{launcher} {shlex.join(again)}")


def exit_without_teardown(run):
    """run(), then leave with its exit status by os._exit, skipping Python's teardown (torchrun's processes only).
    Why: after a run that succeeded, a C++ thread of the gloo process group could still be releasing a finished
    collective's tensors while the interpreter shut down; it asked for a GIL that no longer existed and the process
    aborted ("terminate called without an active exception", from a non-Python thread during teardown: 6 runs in
    140 of 2-process FSDP MoSA on a busy 2-core machine; 0 in 90 since). Every file is written and closed by then
    (the run's lock too), so nothing is left to tear down but memory; stdout and stderr are flushed first. An
    unexpected exception still ends in its traceback."""
    code = None
    try:
        run()
    except SystemExit as e:  # main's one error line (status 1) or Ctrl-C's
        code = e.code
    if code is not None and not isinstance(code, int):  # as Python ends sys.exit("text"): the text, status 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    exit_without_teardown(main) if dist.is_torchelastic_launched() else main()
