"""Tests for train.py --fsdp (FSDP2 under torchrun, gloo on the CPU, 2 processes): it trains like one process
(losses per step, the final adapter) for LoRA, MASA with a bank shared by 2 layers, DoRA, RaSA and MoSA, on an fp32
and a bf16 base; each process holds half the base and loads it without a whole copy; checkpoints cross between
FSDP and one process; a run resumes exactly; two launches meeting on 127.0.0.1 (multi-node) train like one
process; what cannot be sharded is refused in one line. The tiny model and data are test_train.py's."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import adapters
import train
from model import Transformer, safetensors_header
from test_train import (REPO, TINY, base, cli, initial_adapter, metrics, moved, one_error_line, one_thread,  # noqa: F401
                        run_one_and_two_processes, torchrun, weights)


def launch(*flags, args):
    """python -m torch.distributed.run <launch> train.py -- <args>, started in the repository; -> the Popen."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags, "train.py", "--",
                             *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


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
print(json.dumps({"rank": dist.get_rank(), "peak": hwm() - before,
                  "local": sum(p.to_local().numel() * 4 for p in model.parameters() if not p.requires_grad)}))
dist.destroy_process_group()
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
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
           "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(base["model"]), str(d)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
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
