"""Tests for train.py (with checkpoint.py and fsdp.py): DDP equals one process, exact resume, fp16 overflow
handling, bad input, NaN stop, and that the loop trains; then --fsdp (FSDP2 under torchrun, gloo on the CPU, 2
processes): it trains like one process (losses per step, the final adapter) for LoRA, MASA with a bank shared by 2
layers, DoRA, RaSA and MoSA, on an fp32 and a bf16 base; each process holds half the base and loads it without a
whole copy; checkpoints cross between FSDP and one process; a run resumes exactly; two launches meeting on
127.0.0.1 (multi-node) train like one process; what cannot be sharded is refused in one line. A tiny Llama written
by `transformers` (conftest.make_hf_checkpoint) with its tokenizer, and tiny data written here in the CONTRACT
format (meta.json, {split}.bin/.mask.bin/.idx.npy)."""
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
import train
from conftest import make_hf_checkpoint
from model import Tokenizer, Transformer, safetensors_header

REPO = Path(__file__).parent


def write_data(d, tok, n_train=64, n_val=16, seed=0, fingerprint=None, id_offset=0, varied=False):
    """Tiny instruction data in prepare_data.py's format. Prompt: BOS + 2..8 random ids; response: the first
    two prompt ids shifted by 100, then EOS (learnable). Mask 1 on the response and EOS.
    varied=True: prompts of 1..12 ids and responses of 0..9 random ids (+ EOS), drawn independently, so the
    micro-batches of a global batch (sorted by length) hold different numbers of response tokens, and any
    weighting of tokens other than the global mean (per micro-batch, per process, per example) shows."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        toks, masks, offs = [], [], [0]
        for _ in range(n):
            p = rng.integers(10, 60, size=rng.integers(2, 9)) + id_offset
            r = p[:2] + 100
            if varied:
                p = rng.integers(10, 60, size=rng.integers(1, 13))
                r = rng.integers(100, 120, size=rng.integers(0, 10))
            toks += [tok.bos_id, *p, *r, tok.eos_id]
            masks += [0] * (1 + len(p)) + [1] * (len(r) + 1)
            offs.append(len(toks))
        np.array(toks, np.uint32).tofile(d / f"{split}.bin")
        np.array(masks, np.uint8).tofile(d / f"{split}.mask.bin")
        np.save(d / f"{split}.idx.npy", np.array(offs, np.int64))
        splits[split] = {"examples": n, "tokens": len(toks)}
    (d / "meta.json").write_text(json.dumps({
        "format": "nanomasa-sft-v1", "tokenizer": fingerprint or tok.fingerprint, "vocab_size": tok.n_vocab,
        "cutoff": 1024, "template": "test", "recipe": "test", "splits": splits, "tasks": None, "n_cut": 0,
        "n_malformed": 0}))
    return d


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core machine spinning OpenMP threads cost
    seconds per step (torchrun's processes get OMP_NUM_THREADS=1 the same way)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_base(d):
    """A tiny Llama 3 written by transformers into folder d, with its tokenizer -> the Tokenizer. initializer_range
    0.2 (HF's default is 0.02): logits large enough that a few steps visibly learn."""
    make_hf_checkpoint(d, "llama3", tokenizer="json", initializer_range=0.2)
    return Tokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = tiny_base(root / "model")
    return dict(root=root, model=root / "model", data=write_data(root / "data", tok), tok=tok,
                varied=write_data(root / "varied", tok, varied=True))


# small, fast defaults: MASA with a bank shared by two layers, 4 x 2 micro-batches
TINY = ["--adapter", "masa", "--r", "4", "--num_a", "3", "--share_group", "2", "--batch_size", "4",
        "--grad_accum", "2", "--lr", "1e-2", "--eval_every", "0", "--warmup_ratio", "0.2"]


def cli(base, out, *extra, capsys=None):
    """train.main in this process -> (exit code, stderr)."""
    argv = ["--model", str(base["model"]), "--data", str(base["data"]), "--out", str(out), *TINY, *map(str, extra)]
    try:
        train.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, (capsys.readouterr().err if capsys else "")


def metrics(out, key="loss"):
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def weights(out):
    return load_file(str(Path(out) / "adapter.safetensors"))


def moved(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def initial_adapter(base, dtype=torch.float32, **kw):
    model = Transformer.from_pretrained(base["model"], dtype=dtype)
    acfg = adapters.AdapterConfig(adapter="masa", r=4, num_a=3, share_group=2, **kw)
    adapters.inject(model, acfg)
    return {k: v.detach().clone() for k, v in adapters.adapter_params(model).items()}


# -----------------------------------------------------------------------------
# data and schedule


def test_batch_is_right_padded_with_targets_on_response_only(base):
    split = train.Split(base["data"], "train", cutoff=1024)
    tokens = np.fromfile(base["data"] / "train.bin", np.uint32).astype(np.int64)
    mask = np.fromfile(base["data"] / "train.mask.bin", np.uint8)
    idx = np.load(base["data"] / "train.idx.npy")
    ids = np.array([3, 0, 7])
    x, y = split.batch(ids)
    T = max(idx[i + 1] - idx[i] for i in ids) - 1
    assert x.shape == y.shape == (3, T)
    for b, i in enumerate(ids):  # CONTRACT: input t[:-1], targets where(m[1:], t[1:], -100), then padding
        t, m = tokens[idx[i]:idx[i + 1]], mask[idx[i]:idx[i + 1]]
        L = len(t) - 1
        torch.testing.assert_close(x[b, :L], torch.from_numpy(t[:-1]))
        torch.testing.assert_close(y[b, :L], torch.from_numpy(np.where(m[1:] == 1, t[1:], -100)))
        assert (y[b, L:] == -100).all() and (x[b, L:] == 0).all()
    assert split.n_targets[ids].sum() == (y != -100).sum()


def test_batch_respects_cutoff(base):
    split = train.Split(base["data"], "train", cutoff=5)
    x, y = split.batch(np.arange(10))
    assert x.shape[1] == 4
    full = train.Split(base["data"], "train", cutoff=1024)
    xf, yf = full.batch(np.arange(10))
    torch.testing.assert_close(x, xf[:, :4])  # the first cutoff tokens of each example
    torch.testing.assert_close(y, yf[:, :4])
    assert split.n_targets[:10].sum() == (y != -100).sum()


def test_ranks_split_every_global_batch_exactly(base):
    split = train.Split(base["data"], "train", cutoff=1024)
    G, bs, spe = 8, 2, split.n // 8
    seen = []
    for it in range(2 * spe):
        ids = train.global_batch(it, split, G, seed=3, steps_per_epoch=spe)
        np.testing.assert_array_equal(ids, train.global_batch(it, split, G, seed=3, steps_per_epoch=spe))
        one = train.micro_batches(ids, bs, rank=0, world=1)
        two = [train.micro_batches(ids, bs, rank=r, world=2) for r in range(2)]
        assert len(two[0]) == len(two[1]) == len(one) // 2
        # the two processes' micro-batches are exactly the one-process micro-batches, none twice
        assert sorted(map(tuple, one)) == sorted(map(tuple, two[0] + two[1]))
        if it < spe:
            seen += list(ids)
    assert len(seen) == len(set(seen)) == spe * G  # an epoch reads each example at most once
    # each epoch is a new shuffle: epoch 1 does not repeat epoch 0's global batches
    epoch = lambda e: [set(train.global_batch(e * spe + k, split, G, seed=3, steps_per_epoch=spe)) for k in range(spe)]
    assert epoch(1) != epoch(0) and epoch(2) != epoch(1)
    assert (np.diff(split.lens[ids]) <= 0).all()  # longest first: less padding per micro-batch


def test_lr_schedule_matches_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup
    cfg = train.TrainConfig(lr=5e-5, warmup_ratio=0.03)
    for total in (1, 10, 97):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(cfg.warmup_ratio * total), total)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        torch.testing.assert_close([train.get_lr(i, cfg, total) for i in range(total)], ref)
    floor = train.TrainConfig(lr=1.0, min_lr=0.1, warmup_ratio=0.0)
    assert train.get_lr(0, floor, 10) == 1.0 and abs(train.get_lr(10, floor, 10) - 0.1) < 1e-12


def test_flops_formula_matches_flop_counter(base):
    """MFU's FLOPs: 4·N_body per token + 4·N_head per response token + 6·N_adapter per token, against torch's
    FLOP counter on the training call (the counter misses the in-place addmm_ adapters.py uses: mapped here
    like addmm; it does not see CPU attention), and the causal attention term against the counter's own
    formula for the full T x T square."""
    from torch.utils import flop_counter
    model = Transformer.from_pretrained(base["model"])
    mcfg = model.config
    lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_body = sum(m.weight.numel() for n, m in lin.items() if n != "lm_head")
    acfg = adapters.AdapterConfig(adapter="masa", r=4, num_a=3, share_group=2)
    n_ad = sum(acfg.r * (m.in_features + m.out_features) for n, m in lin.items() if n.split(".")[-1] in acfg.target_list)
    layer0_qkv = [lin[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    adapters.inject(model, acfg)
    B, T = 3, 10
    x = torch.randint(0, mcfg.vocab_size, (B, T))
    y = torch.where(torch.arange(T) < 6, -100, x.roll(-1, 1))  # a prompt of 6 positions, then the response
    addmm_ = {torch.ops.aten.addmm_: lambda c, a, b, *args, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=addmm_) as fc:
        model(x, y, return_logits=False, reduction="sum")[1].backward()
    # frozen embeddings: autograd never asks for the input gradient of layer 0's q/k/v (base or adapter)
    skipped = sum(2 * (m.weight.numel() + acfg.r * m.in_features) * B * T for m in layer0_qkv)
    n_head, n_resp = model.lm_head.weight.numel(), int((y != -100).sum())
    assert fc.get_total_flops() == train.flops_per_step(mcfg, n_body, n_head, n_ad, B * T, n_resp, 0) - skipped
    # attention: forward QKᵀ and PV, backward twice that, half of the square under the causal mask
    H, hd = mcfg.n_heads, mcfg.head_dim
    fwd = flop_counter.sdpa_flop_count((1, H, T, hd), (1, H, T, hd), (1, H, T, hd))
    assert train.flops_per_step(mcfg, 0, 0, 0, 0, 0, T * T) == mcfg.n_layers * 3 * fwd // 2


# -----------------------------------------------------------------------------
# training runs


def run_one_and_two_processes(args, tmp_path, two_extra=()):
    """train.py with `args` in this process (-> tmp_path/one) and under torchrun over 2 processes with `args` and
    `two_extra` (-> tmp_path/two); -> the torchrun result (exit status checked)."""
    args = [str(a) for a in args]
    assert train.main(args + ["--out", str(tmp_path / "one")]) is None
    return torchrun([*args, *two_extra, "--out", tmp_path / "two"])


def launcher_env(**extra):
    """This process's environment without the variables torchrun sets for its children (so a test started under
    torchrun does not pass its own rank on), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}, **extra}


def torchrun(args, status=0):
    """train.py `args` under torchrun over 2 processes -> the finished process (exit status checked)."""
    p = launch("--standalone", "--nproc_per_node=2", args=args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == status, err[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_two_processes_under_torchrun_end_with_the_one_process_weights(base, tmp_path):
    # responses of varied length: the two processes hold different numbers of response tokens
    assert uneven_targets(base["varied"], 8, 2, world=2)
    p = run_one_and_two_processes(["--model", base["model"], "--data", base["varied"], *TINY, "--batch_size", "2",
                                   "--grad_accum", "4", "--max_steps", "3", "--eval_every", "3"], tmp_path)
    assert "2 process(es)" in p.stdout
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys() and any(k.startswith("adapter_banks.") for k in one)  # a shared MASA bank
    # Summation order differs (rank sums, then the all-reduce); Adam divides by sqrt(v), which turns fp32
    # rounding on near-zero gradients into differences up to ~lr·1e-3: compare weights at that scale, and
    # the loss and gradient norm (which Adam's scale invariance would hide) tightly.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4)
    assert moved(one, initial_adapter(base))
    torch.testing.assert_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics(tmp_path / "two", "grad_norm"), metrics(tmp_path / "one", "grad_norm"),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics(tmp_path / "two", "val_loss"), metrics(tmp_path / "one", "val_loss"))


def test_logged_losses_equal_transformers_on_the_response_tokens(base, tmp_path):
    """Step 1's train loss and step 0's val loss (the adapter is the identity at init) equal the mean
    cross-entropy over response tokens computed by transformers on each example, unpadded."""
    assert cli(base, tmp_path / "run", "--max_steps", "1", "--eval_every", "1")[0] == 0
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base["model"]), dtype=torch.float32).eval()

    def reference(split, ids):
        tokens = np.fromfile(base["data"] / f"{split}.bin", np.uint32).astype(np.int64)
        mask = np.fromfile(base["data"] / f"{split}.mask.bin", np.uint8)
        idx = np.load(base["data"] / f"{split}.idx.npy")
        total, count = 0.0, 0
        for i in ids:
            t, m = torch.from_numpy(tokens[idx[i]:idx[i + 1]]), torch.from_numpy(mask[idx[i]:idx[i + 1]])
            with torch.no_grad():
                logits = hf(t[None]).logits[0, :-1]
            keep = m[1:] == 1
            total += torch.nn.functional.cross_entropy(logits[keep], t[1:][keep], reduction="sum").item()
            count += int(keep.sum())
        return total / count

    split = train.Split(base["data"], "train", 1024)
    ids = train.global_batch(0, split, G=8, seed=0, steps_per_epoch=split.n // 8)
    assert metrics(tmp_path / "run")[1] == pytest.approx(reference("train", ids), rel=1e-5)
    val = train.Split(base["data"], "val", 1024)
    assert metrics(tmp_path / "run", "val_loss")[0] == pytest.approx(reference("val", range(val.n)), rel=1e-5)
    # --eval_examples 5: the first five val examples; evaluated every 2 steps and at the last step (3), in eval
    # mode (no dropout): the last value is the saved adapter's loss on them
    assert cli(base, tmp_path / "five", "--max_steps", "3", "--eval_every", "2", "--eval_examples", "5",
               "--dropout", "0.3")[0] == 0
    five = metrics(tmp_path / "five", "val_loss")
    assert sorted(five) == [0, 2, 3] and five[0] == pytest.approx(reference("val", range(5)), rel=1e-5)
    model = Transformer.from_pretrained(base["model"])
    adapters.load_adapter(model, tmp_path / "five")
    model.eval()  # the adapter's new Dropout modules start in training mode
    x, y = val.batch(np.arange(5))
    with torch.no_grad():
        total = model(x, y, return_logits=False, reduction="sum")[1].item()
    assert five[3] == pytest.approx(total / int((y != -100).sum()), rel=1e-5)


def uneven_targets(data, G, bs, world=1):
    """True when step 0's global batch gives its micro-batches (and processes) different numbers of response
    tokens: the data can tell the global mean from a mean of means."""
    split = train.Split(data, "train", 1024)
    ids = train.global_batch(0, split, G, seed=0, steps_per_epoch=split.n // G)
    per_rank = [[int(split.n_targets[m].sum()) for m in train.micro_batches(ids, bs, r, world)] for r in range(world)]
    return len({n for ns in per_rank for n in ns}) > 1 and len({sum(ns) for ns in per_rank}) == world


def test_gradient_does_not_depend_on_micro_batching(base, tmp_path):
    """The loss is the mean over the global batch's response tokens, so 8 x 1 = 4 x 2 = 2 x 4 (on data whose
    responses differ in length, so a mean per micro-batch divided by the accumulation steps would differ)."""
    runs = [("8", "1"), ("4", "2"), ("2", "4")]
    base = dict(base, data=base["varied"])
    assert uneven_targets(base["data"], 8, 4) and uneven_targets(base["data"], 8, 2)
    for bs, ga in runs:
        assert cli(base, tmp_path / bs, "--batch_size", bs, "--grad_accum", ga, "--max_steps", "3") == (0, "")
    ref = weights(tmp_path / "8")
    for bs, _ in runs[1:]:
        torch.testing.assert_close(metrics(tmp_path / bs), metrics(tmp_path / "8"), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics(tmp_path / bs, "grad_norm"), metrics(tmp_path / "8", "grad_norm"),
                                   rtol=1e-5, atol=0)
        for k, v in weights(tmp_path / bs).items():  # Adam-aware tolerance, as in the DDP test
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-4)


def test_resume_after_a_kill_repeats_the_straight_run_exactly(base, tmp_path):
    common = ["--max_steps", "6", "--dropout", "0.1", "--eval_every", "2"]  # dropout: the RNG must resume too
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli(base, straight, *common)[0] == 0
    assert cli(base, cut, *common, "--stop_after", "2")[0] == 0
    shutil.copy(cut / "ckpt.pt", tmp_path / "ckpt_step2.pt")
    assert cli(base, cut, *common, "--stop_after", "3", "--resume")[0] == 0
    shutil.copy(tmp_path / "ckpt_step2.pt", cut / "ckpt.pt")  # killed after step 3, last checkpoint at step 2
    assert cli(base, cut, *common, "--resume")[0] == 0
    assert metrics(cut) == metrics(straight) and len(metrics(cut)) == 6
    assert metrics(cut, "val_loss") == metrics(straight, "val_loss")
    recs = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the kill's step 3 logged once
    a, b = weights(straight), weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_resume_restores_each_processes_own_rng(base, tmp_path):
    """Dropout draws differ across processes (seed + rank); a resumed 2-process run must give each process its
    own saved RNG state back, so it repeats the uninterrupted 2-process run exactly."""
    common = ["--model", base["model"], "--data", base["data"], *TINY, "--max_steps", "4", "--dropout", "0.1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    torchrun([*common, "--out", straight])
    torchrun([*common, "--out", cut, "--stop_after", "2"])
    torchrun([*common, "--out", cut, "--resume"])
    assert metrics(cut) == metrics(straight) and len(metrics(cut)) == 4
    a, b = weights(straight), weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_each_process_draws_its_own_dropout_masks(base, tmp_path):
    """Two processes on identical examples: with one dropout stream per process their gradients differ, so the
    step is not the one-process step on half the batch (which is what ranks sharing rank 0's masks would give)."""
    data = write_data(tmp_path / "same", base["tok"], n_train=8, n_val=2)
    idx, toks = np.load(data / "train.idx.npy"), np.fromfile(data / "train.bin", np.uint32)
    mask = np.fromfile(data / "train.mask.bin", np.uint8)
    one_t, one_m = toks[idx[0]:idx[1]], mask[idx[0]:idx[1]]
    np.tile(one_t, 8).tofile(data / "train.bin"), np.tile(one_m, 8).tofile(data / "train.mask.bin")
    np.save(data / "train.idx.npy", np.arange(9, dtype=np.int64) * len(one_t))
    common = ["--model", base["model"], "--data", data, *TINY, "--max_steps", "1", "--dropout", "0.5",
              "--warmup_ratio", "0"]
    torchrun([*common, "--batch_size", "4", "--grad_accum", "2", "--out", tmp_path / "two"])
    assert train.main([*map(str, common), "--batch_size", "4", "--grad_accum", "1", "--out", str(tmp_path / "half")]) is None
    assert metrics(tmp_path / "two") == metrics(tmp_path / "half")  # B = 0 at step 1: dropout cannot change the loss
    assert metrics(tmp_path / "two", "grad_norm") != metrics(tmp_path / "half", "grad_norm")  # but does the gradient
    a, b = weights(tmp_path / "two"), weights(tmp_path / "half")
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith(".B"))


def test_fp16_overflow_skips_the_step_and_keeps_the_weights(base, tmp_path):
    cfg = train.TrainConfig(model=str(base["model"]), data=str(base["data"]), out=str(tmp_path / "ovf"),
                            batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, max_steps=1, eval_every=0,
                            dtype="fp16", init_scale=2.0 ** 100)  # loss x 2^100 overflows fp16 gradients
    acfg = adapters.AdapterConfig(adapter="masa", r=4, num_a=3, share_group=2)
    model = train.train(cfg, acfg)
    assert model.model.embed_tokens.weight.dtype == torch.float16  # frozen base stored in fp16
    assert {p.dtype for p in adapters.adapter_params(model).values()} == {torch.float32}  # fp32 masters
    rec = json.loads((tmp_path / "ovf" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped"] is True and rec["loss_scale"] == 2.0 ** 99 and math.isfinite(rec["loss"])
    init, got = initial_adapter(base, torch.float16), weights(tmp_path / "ovf")
    for k in init:
        assert torch.equal(got[k], init[k]), k
    # control: with the usual scale the same step does move the weights
    assert cli(base, tmp_path / "ok", "--dtype", "fp16", "--max_steps", "1", "--warmup_ratio", "0", "--init_scale", "256")[0] == 0
    rec = json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped"] is False
    assert moved(weights(tmp_path / "ok"), init)
    # the gradient is unscaled before it is clipped and logged: its norm is the fp32 run's (x 256 if not)
    assert cli(base, tmp_path / "fp32", "--max_steps", "1", "--warmup_ratio", "0")[0] == 0
    assert metrics(tmp_path / "ok", "grad_norm")[1] == pytest.approx(metrics(tmp_path / "fp32", "grad_norm")[1], rel=1e-2)


def test_a_micro_batch_without_response_tokens_trains_on(base, tmp_path):
    """Examples whose response was cut away (long prompts) have no target; sorted by length they fill a
    micro-batch of their own, whose loss must be 0 (not NaN) and still run backward (DDP needs it)."""
    tok = base["tok"]
    data = write_data(tmp_path / "d", tok, n_train=12, n_val=4)
    idx, toks = np.load(data / "train.idx.npy"), np.fromfile(data / "train.bin", np.uint32)
    mask = np.fromfile(data / "train.mask.bin", np.uint8)
    long = [tok.bos_id] + list(range(20, 60))  # 41 tokens, all prompt
    toks = np.concatenate([toks, np.array(long * 4, np.uint32)])
    mask = np.concatenate([mask, np.zeros(4 * len(long), np.uint8)])
    idx = np.concatenate([idx, idx[-1] + len(long) * np.arange(1, 5)])
    toks.tofile(data / "train.bin"), mask.tofile(data / "train.mask.bin"), np.save(data / "train.idx.npy", idx)
    b = dict(base, data=data)
    assert cli(b, tmp_path / "run", "--batch_size", "4", "--grad_accum", "4", "--max_steps", "2", "--warmup_ratio", "0")[0] == 0
    assert all(math.isfinite(v) for v in metrics(tmp_path / "run").values())
    assert moved(weights(tmp_path / "run"), initial_adapter(base))


def test_grad_checkpointing_gives_the_same_weights(base, tmp_path):
    assert cli(base, tmp_path / "plain", "--max_steps", "2")[0] == 0
    cfg, acfg = train.parse_args(["--model", str(base["model"]), "--data", str(base["data"]), "--out",
                                  str(tmp_path / "ckpt"), *TINY, "--max_steps", "2", "--grad_checkpoint"])
    assert train.train(cfg, acfg).gradient_checkpointing is True  # the model recomputed its blocks
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert moved(a, initial_adapter(base))
    for k in a:
        torch.testing.assert_close(b[k], a[k])


def test_loss_falls_on_a_tiny_task(base, tmp_path):
    assert cli(base, tmp_path / "run", "--adapter", "lora", "--r", "8", "--max_steps", "24", "--eval_every", "8",
               "--lr", "2e-2")[0] == 0
    val = metrics(tmp_path / "run", "val_loss")
    assert sorted(val) == [0, 8, 16, 24]
    assert val[24] < 0.7 * val[0], val
    loss = metrics(tmp_path / "run")
    assert np.mean([loss[s] for s in range(20, 25)]) < 0.7 * np.mean([loss[s] for s in range(1, 5)])


def test_adapter_none_trains_every_weight_like_one_plain_adamw_step(base, tmp_path):
    """--adapter none (full-parameter, e.g. pretraining the demo base): one step equals AdamW on transformers'
    model with the mean loss over the global batch's response tokens, and OUT/model is an HF checkpoint."""
    import transformers
    out = tmp_path / "run"
    assert cli(base, out, "--adapter", "none", "--max_steps", "1", "--warmup_ratio", "0", "--lr", "1e-3")[0] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base["model"]), dtype=torch.float32)
    split = train.Split(base["data"], "train", 1024)
    tokens = np.fromfile(base["data"] / "train.bin", np.uint32).astype(np.int64)
    mask = np.fromfile(base["data"] / "train.mask.bin", np.uint8)
    total, count = 0, 0
    for i in train.global_batch(0, split, G=8, seed=0, steps_per_epoch=split.n // 8):
        s, e = split.offsets[i], split.offsets[i + 1]
        t, m = torch.from_numpy(tokens[s:e]), torch.from_numpy(mask[s:e])
        keep = m[1:] == 1
        total = total + torch.nn.functional.cross_entropy(hf(t[None]).logits[0, :-1][keep], t[1:][keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    torch.nn.utils.clip_grad_norm_(list(hf.parameters()), 1.0)
    torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0).step()
    ours = Transformer.from_pretrained(out / "model")
    assert Tokenizer.from_pretrained(out / "model").fingerprint == base["tok"].fingerprint
    ref = hf.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)
    assert moved(ours.state_dict(), Transformer.from_pretrained(base["model"]).state_dict())


def test_merge_out_writes_a_merged_checkpoint(base, tmp_path):
    assert cli(base, tmp_path / "run", "--max_steps", "2", "--merge_out", tmp_path / "merged")[0] == 0
    merged = Transformer.from_pretrained(tmp_path / "merged")
    model = Transformer.from_pretrained(base["model"])
    adapters.load_adapter(model, tmp_path / "run")
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)


def test_help_lists_train_and_adapter_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in [f.name for f in dataclasses.fields(train.TrainConfig)] + ["adapter", "r", "num_a", "share_group"]:
        assert f"--{name} " in out or f"--{name}," in out, name


# -----------------------------------------------------------------------------
# bad input: one line, exit 1, nothing written or the last good checkpoint kept


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", ["no_model", "no_data", "tokenizer", "vocab", "adapter", "hyper", "ranks",
                                  "too_few", "merge_router", "resume_missing", "no_targets", "bad_type"])
def test_bad_input_gets_one_line(base, tmp_path, capsys, monkeypatch, case):
    out, extra = tmp_path / "out", []
    b = dict(base)
    if case == "no_model":
        b["model"], want = tmp_path / "nope", "has no config.json"
    elif case == "no_data":
        b["data"], want = tmp_path / "nodata", "has no meta.json"
    elif case == "tokenizer":
        b["data"], want = write_data(tmp_path / "d", base["tok"], fingerprint="0123abcd"), "re-run prepare_data.py with --model"
    elif case == "vocab":
        b["data"], want = write_data(tmp_path / "d", base["tok"], id_offset=2000), "embeds only"
    elif case == "adapter":
        extra, want = ["--adapter", "nope"], "unknown adapter 'nope'"
    elif case == "hyper":
        extra, want = ["--r", "0"], "r (r) must be >= 1"
    elif case == "ranks":  # as torchrun would set it for a second process; the check comes before any connection
        monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
        extra, want = ["--grad_accum", "3"], "do not divide across 2 processes"
    elif case == "too_few":
        extra, want = ["--batch_size", "40"], "fewer than one global batch"
    elif case == "merge_router":
        extra, want = ["--agg", "router", "--merge_out", tmp_path / "m"], "not mergeable"
    elif case == "no_targets":  # every example cut inside its prompt: nothing to learn
        extra, want = ["--cutoff", "3"], "no response tokens to train on"
    elif case == "bad_type":
        extra, want = ["--r", "abc"], "invalid int value"
    else:
        extra, want = ["--resume"], "does not exist"
    code, err = cli(b, out, *extra, "--max_steps", "1", capsys=capsys)
    if case == "ranks":  # only rank 0 prints; rank 1 exits quietly with the same code
        assert code == 1 and err == ""
        monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
        code, err = cli(b, out, *extra, "--max_steps", "1", capsys=capsys)
    assert code == 1
    assert want in one_error_line(err)
    assert not out.exists() and not (tmp_path / "m").exists()


def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoint(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(base, out, "--max_steps", "4", "--stop_after", "1")[0] == 0
    capsys.readouterr()
    before = (out / "ckpt.pt").read_bytes()
    code, err = cli(base, out, "--max_steps", "4", "--lr", "3e-3", "--resume", capsys=capsys)
    assert code == 1 and "train.lr=0.01 but this run has train.lr=0.003" in one_error_line(err)
    code, err = cli(base, out, "--max_steps", "4", capsys=capsys)  # fresh run over a checkpoint
    assert code == 1 and "pass --resume" in one_error_line(err)
    assert (out / "ckpt.pt").read_bytes() == before


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(base, tmp_path, capsys, monkeypatch):
    # the base is poisoned between the two invocations; --resume would refuse the changed base (its content
    # fingerprint differs), so the fingerprint is pinned here: this test is about the NaN stop
    monkeypatch.setattr(train, "weights_fingerprint", lambda d: "pinned")
    model_dir = tmp_path / "model"
    shutil.copytree(base["model"], model_dir)
    b = dict(base, model=model_dir)
    out = tmp_path / "run"
    assert cli(b, out, "--max_steps", "5", "--stop_after", "2")[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    sd = load_file(str(model_dir / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")  # every logit becomes NaN from here on
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    code, err = cli(b, out, "--max_steps", "5", "--resume", capsys=capsys)
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(line) == 1 and "loss is nan at step 3" in line[0] and "(step 2) is kept" in line[0]
    assert (out / "ckpt.pt").read_bytes() == before
    assert max(metrics(out)) == 2


def test_dtype_auto_is_fp16_on_a_gpu_and_fp32_on_a_cpu(base, tmp_path, monkeypatch):
    """SPEC's recipe trains in fp16 mixed precision: --dtype auto must pick it on CUDA (the base loaded in fp16,
    a GradScaler on), and fp32 on a CPU. Checked on any machine: the model load is intercepted."""
    class Loaded(Exception):
        pass

    def fake_load(model_dir, dtype=None, device=None):
        raise Loaded(dtype, device)

    monkeypatch.setattr(train.Transformer, "from_pretrained", fake_load)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # train() sets them on CUDA
    try:
        for cuda, want in ((True, (torch.float16, "cuda")), (False, (torch.float32, "cpu"))):
            monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
            cfg, acfg = train.parse_args(["--model", str(base["model"]), "--data", str(base["data"]),
                                          "--out", str(tmp_path / "run")])
            with pytest.raises(Loaded) as e:
                train.train(cfg, acfg)
            assert (e.value.args[0], e.value.args[1].type) == want
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# -----------------------------------------------------------------------------
# --fsdp: FSDP2 over 2 processes (fsdp.py)


def launch(*flags, args):
    """python -m torch.distributed.run <launch> train.py -- <args>, started in the repository; -> the Popen."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags, "train.py", "--",
                             *map(str, args)], cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fsdp(args, out):
    torchrun([*args, "--fsdp", "--out", out])


def assert_same_training(a, b, weight_tol=1e-4):
    """Runs a and b: equal losses and gradient norms per step (fp32 rounding), adapters within Adam's amplification of
    that rounding (see test_train's DDP test), the same val losses."""
    torch.testing.assert_close(metrics(b), metrics(a), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics(b, "grad_norm"), metrics(a, "grad_norm"), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics(b, "val_loss"), metrics(a, "val_loss"), rtol=1e-6, atol=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=weight_tol, atol=weight_tol)


# --eval_examples 6 over 2 processes x batch 2: the second process runs a filler batch (without targets) at the end
COMMON = ["--batch_size", "2", "--grad_accum", "4", "--max_steps", "3", "--eval_every", "3", "--eval_examples", "6"]


@pytest.mark.parametrize("adapter,dtype", [("lora", "fp32"), ("masa", "fp32"), ("dora", "bf16"), ("rasa", "fp32"),
                                           ("mosa", "fp32")])
def test_fsdp_over_two_processes_trains_like_one_process(base, tmp_path, adapter, dtype):
    """TINY's MASA shares a bank between layers 0 and 1 (share_group 2 of 3 layers); RaSA's pool is shared by all
    three; MoSA's fused W0 + ΔW is built inside a sharded block; DoRA's m starts at the norms of bf16 W0's rows."""
    p = run_one_and_two_processes(["--model", base["model"], "--data", base["data"], *TINY, *COMMON, "--adapter",
                                   adapter, "--dtype", dtype], tmp_path, two_extra=["--fsdp"])
    assert "2 process(es)" in p.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_training(one, two)
    assert any(v.count_nonzero() for k, v in weights(two).items() if re.search(r"\.(B|B_S|lam)(\.0)?$", k))  # trained
    if adapter in ("masa", "rasa"):
        assert any(k.startswith("adapter_banks.") for k in weights(two))  # the shared tensors were trained, once
    # the saved adapter loads with load_adapter anywhere, and the checkpoint is a 1-process checkpoint's twin
    model = Transformer.from_pretrained(base["model"], dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    adapters.load_adapter(model, two)
    for k, v in adapters.adapter_params(model).items():
        assert torch.equal(v.detach(), weights(two)[k])
    a, b = torch.load(one / "ckpt.pt", weights_only=True), torch.load(two / "ckpt.pt", weights_only=True)
    assert a.keys() == b.keys() and a["param_names"] == b["param_names"]
    assert [t.shape for t in a["params"]] == [t.shape for t in b["params"]]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in a["optimizer"]["state"].items()} == \
           {i: {k: v.shape for k, v in s.items()} for i, s in b["optimizer"]["state"].items()}
    if adapter == "lora":
        # each process holds half the base: the step-0 record's base_bytes_per_process (the most any process holds,
        # from its local shards) is fully_shard's dim-0 split, ceil(d0 / 2) rows, of the checkpoint's tensors
        step0 = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
        header = safetensors_header(base["model"] / "model.safetensors")
        total = sum(4 * math.prod(shape) for _, shape, _ in header.values())
        half = sum(4 * math.ceil(shape[0] / 2) * math.prod(shape[1:]) for _, shape, _ in header.values())
        assert step0["base_bytes_per_process"] == half and half <= 0.55 * total


def test_fsdp_with_compile_trains_like_one_eager_process(base, tmp_path):
    """--fsdp --compile, as a GPU user runs it: torch.compile (inductor) over the sharded model, MASA's bank in the
    root's group reached from inside compiled blocks; the same training as one eager process."""
    run_one_and_two_processes(["--model", base["model"], "--data", base["data"], *TINY, *COMMON], tmp_path,
                              two_extra=["--fsdp", "--compile"])
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_fsdp_resumes_exactly_and_checkpoints_cross_between_fsdp_and_one_process(base, tmp_path):
    """Stopped at step 2 and resumed under FSDP: the straight FSDP run, bit for bit. Stopped by one process and
    resumed under FSDP, or the other way round: the uninterrupted 1-process run (to fp32 rounding)."""
    args = ["--model", base["model"], "--data", base["data"], *TINY, *COMMON, "--max_steps", "4"]
    assert cli(base, tmp_path / "one", *COMMON, "--max_steps", "4")[0] == 0
    fsdp(args, tmp_path / "fsdp")
    fsdp([*args, "--stop_after", "2"], tmp_path / "fsdp_cut")
    shutil.copytree(tmp_path / "fsdp_cut", tmp_path / "fsdp_then_one")
    fsdp([*args, "--resume"], tmp_path / "fsdp_cut")
    assert metrics(tmp_path / "fsdp_cut") == metrics(tmp_path / "fsdp") and len(metrics(tmp_path / "fsdp")) == 4
    assert metrics(tmp_path / "fsdp_cut", "grad_norm") == metrics(tmp_path / "fsdp", "grad_norm")
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "fsdp_cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli(base, tmp_path / "fsdp_then_one", *COMMON, "--max_steps", "4", "--resume")[0] == 0
    assert cli(base, tmp_path / "one_then_fsdp", *COMMON, "--max_steps", "4", "--stop_after", "2")[0] == 0
    fsdp([*args, "--resume"], tmp_path / "one_then_fsdp")
    for run in ("fsdp_then_one", "one_then_fsdp"):
        assert sorted(metrics(tmp_path / run)) == [1, 2, 3, 4]
        assert_same_training(tmp_path / "one", tmp_path / run)
    assert moved(weights(tmp_path / "one"), initial_adapter(base))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launches_meeting_on_localhost_train_like_one_process(base, tmp_path):
    """Multi-node as README gives it: one torchrun per node (here two on this machine, one process each) meeting
    through c10d rendezvous at 127.0.0.1:PORT."""
    args = ["--model", base["model"], "--data", base["data"], *TINY, *COMMON]
    assert train.main([*map(str, args), "--out", str(tmp_path / "one")]) is None
    port = free_port()
    nodes = [launch("--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test_fsdp",
                      args=[*args, "--fsdp", "--out", tmp_path / "two"]) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_training(tmp_path / "one", tmp_path / "two")


LOAD = """
import json, re, sys, torch, torch.distributed as dist
import adapters, fsdp
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
dist.init_process_group("gloo")
for d in sys.argv[1:]:  # the tiny model first: imports, the device mesh, DTensor's first dispatches
    model = fsdp.fsdp_skeleton(d, torch.float32, torch.device("cpu"))
    params = adapters.inject(model, adapters.AdapterConfig(adapter="lora", r=4))
    names = {id(p): n for n, p in model.named_parameters()}
    open("/proc/self/clear_refs", "w").write("5")  # peak resident memory counts from here (Linux)
    before = hwm()
    fsdp.shard_model(model, d, torch.device("cpu"), [names[id(p)] for p in params])
line = json.dumps({"rank": dist.get_rank(), "peak": hwm() - before,
                   "local": sum(p.to_local().numel() * 4 for p in model.parameters() if not p.requires_grad)})
print(line + "\\n", end="", flush=True)  # one write: the two processes share the pipe
dist.destroy_process_group()
import train; train.exit_without_teardown(lambda: None)  # as train.py leaves a torchrun process
"""


def test_loading_never_holds_the_whole_checkpoint(base, tmp_path):
    """A random 204 MB checkpoint: each process's peak resident memory while shard_model loads (Linux VmHWM, reset
    just before) stays near its half of the base, well under the checkpoint's size."""
    d = tmp_path / "model"
    d.mkdir()
    C, F, L, V = 512, 1408, 14, 8192  # a Llama's proportions: the blocks hold most of the weights
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=C, intermediate_size=F,
               num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(V, C, generator=g), "lm_head.weight": torch.randn(V, C, generator=g),
          "model.norm.weight": torch.ones(C)}
    for l in range(L):
        p = f"model.layers.{l}."
        sd |= {p + f"self_attn.{n}_proj.weight": torch.randn(C, C, generator=g) for n in "qkvo"}
        sd |= {p + f"mlp.{n}_proj.weight": torch.randn(F, C, generator=g) for n in ("gate", "up")}
        sd |= {p + "mlp.down_proj.weight": torch.randn(C, F, generator=g),
               p + "input_layernorm.weight": torch.ones(C), p + "post_attention_layernorm.weight": torch.ones(C)}
    size = sum(t.numel() * 4 for t in sd.values())
    save_file(sd, str(d / "model.safetensors"))
    del sd
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(base["model"]), str(d)], env=launcher_env(PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", p.stdout)]  # whole objects, however the lines met
    assert len(ranks) == 2 and size > 180e6
    for r in ranks:
        assert r["local"] == size // 2                       # every dimension here is even
        assert r["peak"] < 0.7 * size, (r, size)            # well under the whole checkpoint ...
        assert r["peak"] < r["local"] + 0.1 * size, (r, size)  # ... and near this process's half


@pytest.mark.parametrize("case", ["no_torchrun", "adapter_none", "cola_svd", "prompt_vocab", "merge_out", "ranks"])
def test_fsdp_bad_input_gets_one_line(base, tmp_path, capsys, monkeypatch, case):
    extra, want = {
        "no_torchrun": ([], "--fsdp: shards over the processes torchrun starts"),
        "adapter_none": (["--adapter", "none"], "--fsdp: --adapter none trains every weight"),
        "cola_svd": (["--adapter", "cola", "--cola_init", "svd"], "needs the whole weight in one process"),
        "prompt_vocab": (["--adapter", "prompt_tuning"], "use --prompt_init random"),
        "merge_out": (["--merge_out", tmp_path / "m"], "--merge_out: a merged checkpoint needs every whole base weight"),
        "ranks": (["--grad_accum", "3"], "do not divide across 2 processes"),
    }[case]
    if case != "no_torchrun":  # as torchrun sets it for the first of 2 processes; the checks come before any connection
        monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = cli(base, tmp_path / "out", "--fsdp", *extra, "--max_steps", "1", capsys=capsys)
    assert code == 1 and want in one_error_line(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
