"""
demo.py -- the embedded default: a complete, offline MASA experiment in minutes on a laptop CPU (issue 7).

Nobody can download Llama weights on a fresh offline machine, so the demo brings its own small
LLaMA-architecture base (demo_base/: config.json, model.safetensors, tokenizer.json, pretrained from
scratch by this project's train.py in two stages: plain text — sums, maxima, word reversals and the facts
of a made-up world — then generic multiple-choice quizzes that ask nothing the tasks ask, so it knows the
answer-letter format but not the tasks), and then runs the project's main job:

  1. data      prepare_data.py's `synthetic` recipe: training records + held-out MMLU-format CSVs of
               synthetic.py's made-up tasks (five: a number's parity / divisibility by 5, a word's letters,
               a made-up land's customs)
  2. base      demo_base/ (committed); rebuilt from scratch with --rebuild_base (see docs/demo.md for timing)
  3. finetune  torchrun --nproc_per_node=2 train.py -- --adapter masa ...   (DDP over 2 CPU processes,
               launched as `python -m torch.distributed.run`, the same code path a GPU user runs)
  4. evaluate  eval_mmlu.evaluate_mmlu on the held-out sets, base vs. base + MASA adapter: per-task and
               overall accuracy, trainable parameters and percent, the loss curve (PNG with matplotlib,
               text otherwise)

Everything is cached under --out (default out/demo); re-running reuses what is built unless --rebuild.

Run:
  bash run.sh demo                      # = python demo.py
  python demo.py --rebuild              # redo data, fine-tuning and evaluation
  python demo.py --rebuild_base         # also re-pretrain demo_base/ from scratch with train.py (both stages)
  python demo.py --rebuild_quiz         # redo only the second (quiz) stage, from demo_base/ as it is
  python demo.py --tasks addition,world # other synthetic tasks (prepare_data --syn_tasks)
  python demo.py --compare              # the Table-1-style comparison (each method's lr by val loss)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# config


@dataclass
class DemoConfig:
    out: str = "out/demo"            # cache folder: data/, masa/ (adapter run), results.json, loss.png|txt
    base: str = str(HERE / "demo_base")  # the pretrained base (HF folder); built here when missing
    rebuild: bool = False            # redo data, fine-tuning and evaluation even if cached
    rebuild_base: bool = False       # re-pretrain the base from scratch with train.py (--adapter none), both stages
    rebuild_quiz: bool = False       # run only the base's second (quiz) stage again, on the base as it is
    seed: int = 0                    # data generator and adapter seed
    tasks: str = "parity,multiple,letter,vowel,zorbia"  # synthetic tasks (prepare_data --syn_tasks)
    syn_train: int = 1000            # training problems per task (prepare_data --syn_train)
    syn_test: int = 100              # held-out multiple-choice items per task
    open_form: bool = False          # also fine-tune on the open-form instructions (prepare_data --syn_open_form)
    nproc: int = 2                   # DDP processes for fine-tuning (torchrun --nproc_per_node)
    adapter: str = "masa"            # the adapter to fine-tune (train.py --adapter)
    r: int = 8                       # adapter rank
    lr: float = 7e-4                 # fine-tuning peak learning rate (tiny model: far above the paper's 5e-5;
    #                                  MASA's 5 summed A experts move ~5x faster than one A; docs/demo.md: the comparison)
    epochs: float = 12.0             # fine-tuning passes over the synthetic training split
    batch_size: int = 16             # sequences per micro-batch, per process
    grad_accum: int = 2              # micro-batches per optimizer step over all processes
    # base model (only used when (re)building it): a tiny Llama
    hidden: int = 128                # hidden_size
    layers: int = 4                  # num_hidden_layers
    heads: int = 4                   # attention heads (head_dim = hidden / heads)
    n_merges: int = 300              # BPE merges of the demo tokenizer (vocab = 256 + merges + 2 specials)
    base_steps: int = 1200           # pretraining optimizer steps
    base_lr: float = 3e-3            # pretraining peak learning rate
    quiz_items: int = 60000          # second stage: generic quiz items (prepare_data synthetic_quiz)
    quiz_steps: int = 2000           # second stage: optimizer steps
    quiz_lr: float = 1e-3            # second stage: peak learning rate
    compare: bool = False            # run the paper's Table-1-style comparison instead
    compare_epochs: float = 4.0      # --compare: fine-tuning epochs per run (the demo's 12: ~1.5 h on 2 CPU cores)
    grid: str = "table1"             # --compare: table1 (the MASA paper's Table 1 methods) | all (also issue 8's baselines)


def log(msg):
    print(msg, flush=True)


@contextmanager
def step(name):
    """Print what a step does and how long it took."""
    log(f"\n=== {name}")
    t = time.time()
    yield
    log(f"=== {name}: done in {time.time() - t:.1f} s")


def run(cmd, env=None):
    log("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], cwd=HERE, env={**os.environ, **(env or {})})
    if r.returncode:
        raise RuntimeError(f"command failed with exit status {r.returncode}: {' '.join(map(str, cmd[:6]))} ...")


def train(cfg, flags):
    """train.py with `flags` under torchrun over cfg.nproc processes (`python -m torch.distributed.run`)."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
         "train.py", "--", *flags])


# -----------------------------------------------------------------------------
# 1. data


def build_data(cfg, tok, out):
    """The synthetic set in `out`, reused when it was made with the same settings and tokenizer (an adapter
    older than it is trained again: finetune)."""
    from prepare_data import DataConfig, prepare, synthetic_settings
    dcfg = DataConfig(recipe="synthetic", out=str(out), seed=cfg.seed, syn_tasks=cfg.tasks, syn_train=cfg.syn_train,
                      syn_test=cfg.syn_test, syn_open_form=cfg.open_form, cutoff=512)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    if (meta.get("synthetic") == synthetic_settings(dcfg) and meta.get("tokenizer") == tok.fingerprint
            and not cfg.rebuild and (out / "mmlu" / "categories.json").is_file()):
        log(f"reusing {out} (pass --rebuild to regenerate)")
        return
    shutil.rmtree(out, ignore_errors=True)
    prepare(dcfg, tok, log=log)


# -----------------------------------------------------------------------------
# 2. base: a tiny Llama pretrained from scratch by train.py (full-parameter mode, --adapter none)


def base_config(cfg, vocab, tok):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": cfg.hidden, "intermediate_size": 3 * cfg.hidden, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads, "head_dim": cfg.hidden // cfg.heads,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "torch_dtype": "float32"}


def tokenizer_texts(cfg):
    """What the base's BPE tokenizer learns from: English words, the prompt templates and names, from the
    pretraining text and the prompts of 200 synthetic training problems per task (never a held-out one:
    synthetic_records with the demo's syn_test); not the random reversal words (their letters stay mostly
    single tokens)."""
    import prepare_data as P
    from synthetic import synthetic_pretrain_texts
    texts = synthetic_pretrain_texts(cfg.seed, cfg.syn_train, cfg.syn_test)
    prompts = [r.get("prompt") or P.format_prompt(r["instruction"])
               for r in P.synthetic_records(cfg.seed, 200, cfg.syn_test)]
    return [x for x in texts if "reversed" not in x] + prompts


def write_tokenizer(cfg, out):
    """The base's BPE tokenizer -> out/tokenizer.json; -> vocab size."""
    from synthetic import write_bpe_tokenizer
    return write_bpe_tokenizer(out, tokenizer_texts(cfg), cfg.n_merges)


def build_base(cfg, work):
    """Tokenizer -> random-init checkpoint -> pretraining text -> train.py --adapter none -> cfg.base."""
    import torch
    from safetensors.torch import save_file
    import prepare_data as P
    from model import ModelConfig, Tokenizer, Transformer
    init, data, run_dir = work / "init", work / "pretrain_data", work / "pretrain_run"
    for d in (init, data, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    vocab = write_tokenizer(cfg, init)
    tok = Tokenizer.from_pretrained(init)
    log(f"tokenizer: {vocab} ids ({cfg.n_merges} BPE merges) in {time.time() - t:.1f} s")
    hf = base_config(cfg, vocab, tok)
    (init / "config.json").write_text(json.dumps(hf, indent=2))
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.from_hf_dict(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k},
              str(init / "model.safetensors"), metadata={"format": "pt"})
    P.prepare(P.DataConfig(recipe="synthetic_pretrain", out=str(data), seed=cfg.seed, syn_train=cfg.syn_train,
                           syn_test=cfg.syn_test, cutoff=512, val_frac=0.02), tok, log=log)
    train(cfg, base_train_flags(cfg, init, data, run_dir))
    install_base(cfg, run_dir / "model")
    build_quiz_stage(cfg, work)


def build_quiz_stage(cfg, work):
    """Second stage: cfg.base -> train.py --adapter none on generic quizzes (synthetic_quiz) -> cfg.base."""
    import prepare_data as P
    from model import Tokenizer
    data, run_dir = work / "quiz_data", work / "quiz_run"
    for d in (data, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    P.prepare(P.DataConfig(recipe="synthetic_quiz", out=str(data), seed=cfg.seed, syn_quiz=cfg.quiz_items,
                           cutoff=512, val_frac=0.02), Tokenizer.from_pretrained(cfg.base), log=log)
    train(cfg, quiz_train_flags(cfg, cfg.base, data, run_dir))
    install_base(cfg, run_dir / "model")


def install_base(cfg, model_dir):
    """Copy a finished run's model folder to cfg.base (temporary name, then renamed into place)."""
    tmp = Path(str(cfg.base) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    shutil.rmtree(cfg.base, ignore_errors=True)
    tmp.rename(cfg.base)


def base_train_flags(cfg, init, data, run_dir):
    return ["--adapter", "none", "--model", init, "--data", data, "--out", run_dir, "--max_steps", cfg.base_steps,
            "--lr", cfg.base_lr, "--min_lr", f"{cfg.base_lr / 10:g}", "--warmup_ratio", 0.03, "--batch_size", 16,
            "--grad_accum", 2, "--eval_every", 200, "--save_every", 0, "--cutoff", 512, "--seed", cfg.seed]


def quiz_train_flags(cfg, base, data, run_dir):
    return ["--adapter", "none", "--model", base, "--data", data, "--out", run_dir, "--max_steps", cfg.quiz_steps,
            "--lr", cfg.quiz_lr, "--warmup_ratio", 0.05, "--batch_size", 16, "--grad_accum", 2,
            "--eval_every", 250, "--save_every", 0, "--cutoff", 512, "--seed", cfg.seed]


# -----------------------------------------------------------------------------
# 3. fine-tune with the adapter, DDP over nproc CPU processes


def finetune(cfg, data, run_dir, adapter_flags, seed=None):
    """torchrun train.py with the adapter flags; skipped when run_dir already holds an adapter trained with the
    same adapter flags and schedule (its run.json) after the data and the base were last written."""
    seed = cfg.seed if seed is None else seed
    want = {**{("train", k): v for k, v in (("epochs", cfg.epochs), ("lr", cfg.lr), ("batch_size", cfg.batch_size),
                                            ("grad_accum", cfg.grad_accum), ("seed", seed))},
            **{("adapter", k.lstrip("-")): v for k, v in zip(adapter_flags[::2], adapter_flags[1::2])}}
    done = run_dir / "adapter.json"
    if done.is_file() and (run_dir / "run.json").is_file() and not cfg.rebuild:
        have = json.loads((run_dir / "run.json").read_text())
        newer = done.stat().st_mtime >= max((Path(data) / "meta.json").stat().st_mtime,
                                            (Path(cfg.base) / "model.safetensors").stat().st_mtime)
        if newer and all(same_value(have[part].get(k), v) for (part, k), v in want.items()):
            log(f"reusing {run_dir} (pass --rebuild to fine-tune again)")
            return
        log(f"{run_dir} holds an adapter trained on older data / base or with other settings: fine-tuning again")
    shutil.rmtree(run_dir, ignore_errors=True)
    train(cfg, [*adapter_flags, "--model", cfg.base, "--data", data, "--out", run_dir, "--epochs", cfg.epochs,
                "--lr", cfg.lr, "--batch_size", cfg.batch_size, "--grad_accum", cfg.grad_accum, "--warmup_ratio", 0.05,
                "--eval_every", 100, "--save_every", 0, "--cutoff", 512, "--seed", seed])


def same_value(a, b):
    """A run.json value against a command-line value: numbers by value (16 == 16.0), the rest as text."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


# -----------------------------------------------------------------------------
# 4. evaluate and report


def evaluate(cfg, mmlu, run_dir=None):
    """Zero-shot MMLU-protocol accuracy of the base (run_dir None) or base + the adapter saved in run_dir;
    -> (summary, param_report or None)."""
    import torch
    import adapters
    from eval_mmlu import evaluate_mmlu
    from model import Tokenizer, Transformer
    tok = Tokenizer.from_pretrained(cfg.base)
    model = Transformer.from_pretrained(cfg.base, dtype=torch.float32).eval()
    rep = None
    if run_dir is not None:
        adapters.load_adapter(model, run_dir)
        rep = adapters.param_report(model)
    return summary(evaluate_mmlu(model, tok, mmlu, shots=0, progress=False)), rep


def evaluate_both(cfg, mmlu, run_dir):
    before, _ = evaluate(cfg, mmlu)
    after, rep = evaluate(cfg, mmlu, run_dir)
    return {"before": before, "after": after, "trainable": rep["trainable"], "base_params": rep["base"],
            "percent": rep["percent"]}


def summary(res):
    return {"overall": res["accuracy"], "tasks": {s: v["acc"] for s, v in sorted(res["subjects"].items())},
            "n": {s: v["n"] for s, v in sorted(res["subjects"].items())}}


def table(res, adapter):
    tasks = list(res["before"]["tasks"])
    lines = ["| task | n | base | base + " + adapter + " |", "|---|---:|---:|---:|"]
    for t in tasks:
        lines.append(f"| {t} | {res['before']['n'][t]} | {100 * res['before']['tasks'][t]:.1f}% | "
                     f"{100 * res['after']['tasks'][t]:.1f}% |")
    lines.append(f"| **overall** | {sum(res['before']['n'].values())} | {100 * res['before']['overall']:.1f}% | "
                 f"**{100 * res['after']['overall']:.1f}%** |")
    lines.append(f"\ntrainable parameters: {res['trainable']:,} of {res['base_params']:,} base "
                 f"({res['percent']:.2f}% = trainable / (base + trainable)); chance = 25%")
    return "\n".join(lines)


def loss_curve(run_dir, out):
    """Train loss per step (+ val loss) from metrics.jsonl: a PNG with matplotlib, else a text plot."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="val")
        ax.set(xlabel="step", ylabel="loss (response tokens)", yscale="log", title="fine-tuning loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        log(f"loss curve: {out / 'loss.png'}")
    except ImportError:
        pass
    text = text_plot(train, val)
    (out / "loss.txt").write_text(text + "\n")
    log(text)


def text_plot(train, val, width=60, height=12):
    if not train:
        return "(no loss records)"
    n = len(train)
    cols = [train[min(n - 1, int(i * n / width)):max(int((i + 1) * n / width), int(i * n / width) + 1)] for i in range(width)]
    ys = [sum(l for _, l in c) / len(c) for c in cols if c]
    lo, hi = min(ys), max(ys)
    rows = [[" "] * len(ys) for _ in range(height)]
    for x, y in enumerate(ys):
        rows[int((hi - y) / (hi - lo + 1e-12) * (height - 1))][x] = "*"
    out = [f"train loss, steps 1..{train[-1][0]} (mean per column)"]
    for i, r in enumerate(rows):
        lab = hi - i * (hi - lo) / (height - 1)
        out.append(f"{lab:7.3f} |" + "".join(r))
    out.append(" " * 8 + "+" + "-" * len(ys))
    if val:
        out.append("val loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in val))
    return "\n".join(out)


# -----------------------------------------------------------------------------
# main


def demo(cfg: DemoConfig):
    from model import Tokenizer
    t0 = time.time()
    out = Path(cfg.out)
    if not out.is_absolute():
        out = HERE / out
    out.mkdir(parents=True, exist_ok=True)
    base_ok = (Path(cfg.base) / "config.json").is_file() and (Path(cfg.base) / "model.safetensors").is_file()
    with step(f"1/4 base model: {cfg.base}"):
        if cfg.rebuild_base or not base_ok:
            log("pretraining the base from scratch with train.py --adapter none (full-parameter, two stages)")
            build_base(cfg, out / "base_work")
        elif cfg.rebuild_quiz:
            log("second pretraining stage (generic quizzes) on the base as it is")
            build_quiz_stage(cfg, out / "base_work")
        else:
            log("using the committed base (pass --rebuild_base to pretrain it again from scratch)")
        hf = json.loads((Path(cfg.base) / "config.json").read_text())
        log(f"LlamaForCausalLM: hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers, "
            f"vocab {hf['vocab_size']}")
    tok = Tokenizer.from_pretrained(cfg.base)
    with step("2/4 synthetic dataset (prepare_data.py synthetic)"):
        build_data(cfg, tok, out / "data")
    run_dir = out / cfg.adapter
    with step(f"3/4 fine-tune {cfg.adapter} with DDP over {cfg.nproc} CPU processes (torchrun train.py)"):
        if cfg.rebuild:
            (out / "results.json").unlink(missing_ok=True)
        finetune(cfg, out / "data", run_dir, ["--adapter", cfg.adapter, "--r", cfg.r, "--alpha", 2 * cfg.r])
    with step("4/4 evaluate base and base + adapter on the held-out multiple-choice sets (eval_mmlu)"):
        res_file = out / "results.json"
        if res_file.is_file() and not cfg.rebuild and res_file.stat().st_mtime >= (run_dir / "adapter.json").stat().st_mtime:
            res = json.loads(res_file.read_text())
            log(f"reusing {res_file}")
        else:
            res = evaluate_both(cfg, out / "data" / "mmlu", run_dir)
            res_file.write_text(json.dumps(res, indent=2))
        log("")
        log(table(res, cfg.adapter))
        log("")
        loss_curve(run_dir, out)
    log(f"\ndemo finished in {time.time() - t0:.1f} s; results in {out}")
    return res


# The paper's Table 1 methods at this scale: name -> train.py adapter flags
COMPARE_METHODS = {
    "LoRA (r=8)": ["--adapter", "lora", "--r", 8, "--alpha", 16],
    "LoRA (r=16)": ["--adapter", "lora", "--r", 16, "--alpha", 32],
    "DoRA (r=8)": ["--adapter", "dora", "--r", 8, "--alpha", 16],
    "HydraLoRA (r=8, 3 B)": ["--adapter", "hydralora", "--r", 8, "--alpha", 16, "--num_b", 3],
    "MASA (r=8, 5A, S=2)": ["--adapter", "masa", "--r", 8, "--alpha", 16, "--num_a", 5, "--share_group", 2],
    "MAE (r=8, 5A, S=1)": ["--adapter", "masa", "--r", 8, "--alpha", 16, "--num_a", 5, "--share_group", 1],
    "RaSA (r=8)": ["--adapter", "rasa", "--r", 8, "--alpha", 16],
    "MoSA (default)": ["--adapter", "mosa"],
}
# The paper's other baselines (issue 8), at their authors' defaults scaled to this base (hidden 128): VeRA at r = 256
# (peft's default; its Llama rank 1024 exceeds every dimension here), VB-LoRA with vectors of b = 32 (256 divides
# no dimension of this model), the task-gated methods with the synthetic tasks as their tasks (from meta.json).
COMPARE_EXTRA = {
    "CoLA (r=8, 2A, 3B, svd)": ["--adapter", "cola", "--r", 8, "--alpha", 16],
    "MultiLoRA (r=8, n=3)": ["--adapter", "multilora", "--r", 8, "--alpha", 16],
    "BSLoRA (2/4/8, slice)": ["--adapter", "bslora"],
    "LoRAMoE (r=4, N=6, FFN)": ["--adapter", "loramoe"],
    "MoELoRA (r=16, N=8, task gate)": ["--adapter", "moelora"],
    "MTL-LoRA (r=8, n=3, q,k,v,o)": ["--adapter", "mtllora"],
    "VeRA (r=256)": ["--adapter", "vera", "--r", 256],
    "VB-LoRA (r=4, h=256, b=32)": ["--adapter", "vblora", "--vb_num_vectors", 256, "--vb_vector_len", 32],
    "Prompt tuning (P=20)": ["--adapter", "prompt_tuning"],
    "P-tuning v2 (P=20)": ["--adapter", "p_tuning_v2"],
}
COMPARE_SEEDS = (0, 1, 2)
# each method's learning rate: of these, the one with the lowest final validation loss (the synthetic training
# data's val split, never the held-out sets) at the first seed. One lr for all would favour some methods: MASA's
# summed A experts share one gradient, so at a given lr their sum moves ~num_a times faster than one A.
COMPARE_LRS = (7e-4, 2e-3)


def final_val_loss(run_dir):
    """The last validation loss train.py logged in run_dir/metrics.jsonl."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    if not losses:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no validation loss: was the data's val split empty?")
    return losses[-1]


def compare(cfg: DemoConfig):
    """Every COMPARE_METHODS entry fine-tuned like the demo (same data and base; cfg.compare_epochs): its lr
    chosen among COMPARE_LRS by final validation loss at the first seed, then every COMPARE_SEEDS at that lr;
    accuracy per task, average and params % as mean +- sample std over seeds -> OUT/compare.md."""
    import statistics
    t0 = time.time()
    out = Path(cfg.out)
    out = out if out.is_absolute() else HERE / out
    from model import Tokenizer
    with step("data"):
        build_data(cfg, Tokenizer.from_pretrained(cfg.base), out / "data")
    mmlu = out / "data" / "mmlu"
    rows = {}
    if cfg.grid not in ("table1", "all"):
        raise ValueError(f"unknown grid {cfg.grid!r}: choose table1 or all")
    methods = {**COMPARE_METHODS, **(COMPARE_EXTRA if cfg.grid == "all" else {})}
    cfg = replace(cfg, epochs=cfg.compare_epochs)

    trained = set()  # run folders fine-tuned by this call (the chosen lr's first-seed run serves twice)

    def fit(name, flags, lr, seed):
        run_dir = out / "compare" / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-lr{lr:g}-s{seed}")
        if run_dir not in trained:
            finetune(replace(cfg, lr=lr), out / "data", run_dir, flags, seed=seed)
            trained.add(run_dir)
        return run_dir

    for name, flags in methods.items():
        with step(f"{name}: learning rate, seed {COMPARE_SEEDS[0]}"):
            val = {}
            for lr in COMPARE_LRS:
                try:
                    val[lr] = final_val_loss(fit(name, flags, lr, COMPARE_SEEDS[0]))
                except RuntimeError as e:  # e.g. diverged: train.py stops on a non-finite loss
                    log(f"{name} at lr {lr:g} failed ({e}): not a candidate")
                    val[lr] = float("inf")
            lr = min(val, key=val.get)
            if val[lr] == float("inf"):
                raise RuntimeError(f"{name}: no learning rate of {COMPARE_LRS} trained; see the log above")
            log(f"{name}: final val loss " + ", ".join(f"{v:.4f} at lr {k:g}" for k, v in val.items()) + f" -> lr {lr:g}")
        for seed in COMPARE_SEEDS:
            with step(f"{name}, lr {lr:g}, seed {seed}"):
                run_dir = fit(name, flags, lr, seed)
                res_file = run_dir / "eval.json"
                if not res_file.is_file() or cfg.rebuild or res_file.stat().st_mtime < (run_dir / "adapter.json").stat().st_mtime:
                    acc, rep = evaluate(cfg, mmlu, run_dir)
                    res_file.write_text(json.dumps({"acc": acc, "percent": rep["percent"], "lr": lr}))
                r = json.loads(res_file.read_text())
                log(f"{name} seed {seed}: overall {100 * r['acc']['overall']:.1f}%")
                rows.setdefault(name, []).append(r)
    base, _ = evaluate(cfg, mmlu)
    tasks = list(base["tasks"])
    ms = lambda xs: f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"
    lines = [f"| method | params % | lr | {' | '.join(tasks)} | avg |", "|---|---:|---:|" + "---:|" * (len(tasks) + 1),
             "| base (no fine-tuning) | 0 | - | " + " | ".join(f"{100 * base['tasks'][t]:.1f}" for t in tasks)
             + f" | {100 * statistics.mean(base['tasks'].values()):.1f} |"]
    for name, rs in rows.items():
        lines.append(f"| {name} | {rs[0]['percent']:.2f} | {rs[0]['lr']:g} | "
                     + " | ".join(ms([r["acc"]["tasks"][t] for r in rs]) for t in tasks)
                     + f" | {ms([statistics.mean(r['acc']['tasks'].values()) for r in rs])} |")
    text = (f"Accuracy (%) on the synthetic held-out multiple-choice sets (zero-shot, MMLU protocol), mean ± "
            f"sample std over seeds {', '.join(map(str, COMPARE_SEEDS))}; {cfg.epochs:g} epochs; lr = each method's "
            f"choice among {', '.join(f'{x:g}' for x in COMPARE_LRS)} by final validation loss at seed "
            f"{COMPARE_SEEDS[0]}; avg = unweighted mean over tasks; params % = trainable / (base + trainable)."
            f"\n\n" + "\n".join(lines) + "\n")
    (out / "compare.md").write_text(text)
    log("\n" + text + f"\nwritten to {out / 'compare.md'}; comparison finished in {time.time() - t0:.1f} s")


def parse_args(argv=None):
    from adapters import add_dataclass_args, dataclass_from_args
    from model import ArgParser  # a bad flag: one `error:` line and exit 1, as in every script
    p = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, DemoConfig)
    return dataclass_from_args(DemoConfig, p.parse_args(argv))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        from synthetic import synthetic_tasks
        synthetic_tasks(cfg.tasks, flag="--tasks")  # a typo fails here, before anything is built
        compare(cfg) if cfg.compare else demo(cfg)
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
