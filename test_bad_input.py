"""Bad input and faults on every command line (train.py, prepare_data.py, eval_mmlu.py, model.py, adapters.py):
one line `error: <file or flag>: <problem>: <fix>`, exit status 1, no traceback, no file changed. Then the
classes that need more than one call: a run's exclusive hold on --out (live and killed holders), --overwrite,
a base of the same shape with other weights, Ctrl-C, a full disk during a checkpoint write, a torn
metrics.jsonl, swept temporary files. The CLIs run in this process (main(argv), SystemExit caught): fast; one
failure runs under torchrun, whose processes train.py leaves by os._exit."""
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
import eval_mmlu
import model as model_py
import prepare_data
import train
from conftest import make_hf_checkpoint
from model import Transformer, weights_fingerprint
from test_train import REPO, TINY, one_error_line, one_thread, tiny_base, torchrun, write_data  # noqa: F401  (one_thread: autouse)

CLIS = {"train": train.main, "prepare": prepare_data.main, "eval": eval_mmlu.main, "model": model_py.main,
        "adapters": adapters.main}


def write_mmlu(d, n_dev=5):
    """A tiny MMLU-style folder: subject 'algebra' with 3 test and n_dev dev rows."""
    for split, n in (("test", 3), ("dev", n_dev)):
        (d / split).mkdir(parents=True, exist_ok=True)
        rows = [f"What is {i} + {i}?,{2 * i},{i},{i + 1},{3 * i},A\n" for i in range(1, n + 1)]
        (d / split / f"algebra_{split}.csv").write_text("".join(rows))
    return d


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The world the bad inputs are made from: a tiny base, its data, a finished run (adapter), MMLU CSVs."""
    root = tmp_path_factory.mktemp("bad")
    tok = tiny_base(root / "model")
    data = write_data(root / "data", tok)
    run = root / "run"
    assert call("train", base_args(root / "model", data, run, "--max_steps", "2", "--stop_after", "1"))[0] == 0
    assert call("train", base_args(root / "model", data, run, "--max_steps", "2", "--resume"))[0] == 0
    return dict(root=root, model=root / "model", data=data, run=run, tok=tok, mmlu=write_mmlu(root / "mmlu"))


def base_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), *TINY, *map(str, extra)]


def call(cli, argv, capsys=None):
    """CLIS[cli](argv) in this process -> (exit status, stderr)."""
    try:
        CLIS[cli](argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, (capsys.readouterr().err if capsys else "")


def snapshot(*roots):
    """{path: sha256 or 'dir'} of everything under roots: what 'no file changed' compares."""
    snap = {}
    for r in roots:
        for p in sorted(Path(r).rglob("*")):
            snap[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def error_line_after_progress(err):
    """The one error line of a run that failed after its progress bar started (the bar shares stderr)."""
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -----------------------------------------------------------------------------
# helpers that make one bad thing in a copy


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(file, change):
    d = json.loads(Path(file).read_text())
    change(d)
    Path(file).write_text(json.dumps(d))


def other_base(w, t):
    """Same config and tokenizer, other weights: what an instruct variant of the base looks like here."""
    d = t / "other"
    make_hf_checkpoint(d, "llama3", tokenizer="json", initializer_range=0.2, seed=1)
    return d


def changed_copy(src, dst, change):
    """A copy of src at dst with change(copy) applied: the bad input, made without touching w's originals."""
    change(copy(src, dst))
    return dst


def bad_model(w, t, change):
    return changed_copy(w["model"], t / "m", change)


def bad_data(w, t, change):
    return changed_copy(w["data"], t / "d", change)


def bad_adapter(w, t, change):
    d = t / "ad"
    d.mkdir()
    for f in ("adapter.json", "adapter.safetensors"):
        shutil.copy(w["run"] / f, d / f)
    change(d)
    return d


def edit_tensors(d, change):
    f = d / "adapter.safetensors"
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f))  # without the saved config tag: as another tool would write it


def eval_args(w, *extra, model=None, data=None):
    return ["--model", str(model or w["model"]), "--data", str(data or w["mmlu"]), "--batch_size", "4", *map(str, extra)]


def train_args(w, out, *extra, model=None, data=None):
    return base_args(model or w["model"], data or w["data"], out, "--max_steps", "2", *extra)


def resume_args(w, t, *extra, model=None, data=None):
    out = copy(w["run"], t / "run")
    return train_args(w, out, "--resume", *extra, model=model, data=data)


def hold_lock(t):
    """An flock on OUT/.lock taken through another open file, as a second train.py run would hold it."""
    out = t / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 1 on elsewhere\n")
    hold_lock.fds.append(fd)
    return out


hold_lock.fds = []


def npy_garbage(d):
    (d / "train.idx.npy").write_bytes(b"\x93NUMPY garbage that is no header")


def offsets_backwards(d):
    idx = np.load(d / "train.idx.npy")
    idx[3], idx[4] = idx[4], idx[3]
    np.save(d / "train.idx.npy", idx)


def task_ids_beyond(d):  # two task names, a task id 2 among the examples' ids
    edit_json(d / "meta.json", lambda m: m.update(tasks=["a", "b"]))
    for split in ("train", "val"):
        n = len(np.load(d / f"{split}.idx.npy")) - 1
        np.save(d / f"{split}.task.npy", (np.arange(n) % 3).astype(np.int32))


def mask_byte(d):
    m = np.fromfile(d / "train.mask.bin", np.uint8)
    m[m == 1] = 2  # "true" written as another byte: every loss would be 0
    m.tofile(d / "train.mask.bin")


def val_beyond_vocab(d):
    t = np.fromfile(d / "val.bin", np.uint32)
    t[5] = 10_000
    t.tofile(d / "val.bin")


def same_counts_other_content(d):
    t = np.fromfile(d / "train.bin", np.uint32)
    t[(t >= 10) & (t < 60)] += 1  # other prompt tokens, every count (examples, tokens, meta.json) the same
    t.tofile(d / "train.bin")


def rope_theta(c, v):  # transformers 5 writes it inside rope_parameters, older configs at the top level
    c.setdefault("rope_parameters", {}).update(rope_theta=v) if "rope_parameters" in c else c.update(rope_theta=v)


def nan_base(d):
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def truncate(f, keep=0.5):
    b = Path(f).read_bytes()
    Path(f).write_bytes(b[:int(len(b) * keep)])


def empty_subject(d):  # two subjects, one of them with an empty test CSV
    for split in ("test", "dev"):
        shutil.copy(d / split / f"algebra_{split}.csv", d / split / f"geometry_{split}.csv")
    (d / "test" / "algebra_test.csv").write_text("")


def latin1_csv(d):
    (d / "test" / "algebra_test.csv").write_bytes("Caf\u00e9 au lait?,a,b,c,d,A\n".encode("latin-1"))


# Each case: (command line, argv builder(w, tmp), text the one line must hold). Grouped by the classes.
CASES = {
    # data lost
    "train_out_in_use": ("train", lambda w, t: train_args(w, hold_lock(t)), "is in use by a running train.py"),
    "train_over_finished_run_without_ckpt": ("train", lambda w, t: train_args(w, remove(copy(w["run"], t / "r"), "ckpt.pt")),
                                             "already holds a run"),
    "train_merge_out_is_model": ("train", lambda w, t: train_args(w, t / "o", "--merge_out", w["model"]),
                                 "is the --model folder"),
    "train_merge_out_holds_checkpoint": ("train", lambda w, t: train_args(w, t / "o", "--merge_out", copy(w["model"], t / "m")),
                                         "already holds a checkpoint"),
    "eval_out_names_a_data_file": ("eval", lambda w, t: eval_args(w, "--out", copy(w["mmlu"], t / "mmlu") / "test" /
                                                               "algebra_test.csv"), "is not an eval_mmlu.py results file"),
    "prepare_synthetic_over_a_real_mmlu_folder": ("prepare", lambda w, t: [
        "synthetic", "--model", str(w["model"]), "--out", str(copy(w["mmlu"], t / "o" / "mmlu").parent)],
        "was not written by prepare_data.py"),
    "train_resume_into_a_folder_without_a_run": ("train", lambda w, t: train_args(w, mkdir(t / "mine"), "--resume"),
                                                 "does not exist"),
    "train_merge_out_under_a_file": ("train", lambda w, t: train_args(w, t / "o", "--merge_out", write(t / "f", "x") / "m"),
                                     "a folder above it is a file"),
    "eval_out_under_a_file": ("eval", lambda w, t: eval_args(w, "--out", write(t / "f", "x") / "results.json"),
                              "a folder above it is a file"),
    "train_resume_and_overwrite": ("train", lambda w, t: train_args(w, t / "o", "--resume", "--overwrite"), "pass one of them"),
    # silently wrong
    "train_resume_other_base_same_shape": ("train", lambda w, t: resume_args(w, t, model=other_base(w, t)), "other weights"),
    "train_resume_other_data_same_counts": ("train", lambda w, t: resume_args(
        w, t, data=bad_data(w, t, same_counts_other_content)), "other content"),
    "train_mask_byte_not_0_or_1": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(w, t, mask_byte)), "mask bytes"),
    "train_offsets_backwards": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(w, t, offsets_backwards)),
                                "never decrease"),
    "train_task_ids_out_of_range": ("train", lambda w, t: train_args(
        w, t / "o", "--adapter", "mtllora", "--num_a", "1", data=bad_data(w, t, task_ids_beyond)), "train.task.npy: task ids"),
    "train_negative_max_steps": ("train", lambda w, t: train_args(w, t / "o", "--max_steps", "-5"), "--max_steps -5"),
    "train_negative_stop_after": ("train", lambda w, t: train_args(w, t / "o", "--stop_after", "-1"), "--stop_after -1"),
    "train_negative_epochs": ("train", lambda w, t: base_args(w["model"], w["data"], t / "o", "--epochs", "-1"),
                              "--epochs -1.0"),
    "train_negative_rope_theta": ("train", lambda w, t: train_args(w, t / "o", model=bad_model(
        w, t, lambda d: edit_json(d / "config.json", lambda c: rope_theta(c, -500000.0)))), "rope_theta is -500000.0"),
    "model_negative_rms_norm_eps": ("model", lambda w, t: ["--model", str(bad_model(
        w, t, lambda d: edit_json(d / "config.json", lambda c: c.update(rms_norm_eps=-1e-5)))), "--prompt", "hi"],
        "rms_norm_eps is -1e-05"),
    "eval_adapter_other_base_same_shape": ("eval", lambda w, t: eval_args(w, "--adapter", w["run"], model=other_base(w, t)),
                                           "other weights"),
    "eval_nan_in_adapter": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(w, t, lambda d: edit_tensors(
        d, lambda sd: sd[next(iter(sd))].view(-1).__setitem__(0, float("nan"))))), "NaN or infinite values"),
    "eval_integer_adapter_tensor": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(w, t, lambda d: edit_tensors(
        d, lambda sd: sd.update({k: v.to(torch.int32) for k, v in list(sd.items())[:1]})))), "not floating point"),
    "eval_alpha_changed_in_adapter_json": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(w, t, lambda d: edit_json(
        d / "adapter.json", lambda m: m["config"].update(alpha=32.0)))), "trained with alpha=16.0"),
    "eval_nan_logits": ("eval", lambda w, t: eval_args(w, model=bad_model(w, t, nan_base)), "logits are NaN"),
    "eval_empty_test_csv": ("eval", lambda w, t: eval_args(w, "--subjects", "algebra,geometry", data=bad_data_mmlu(
        w, t, empty_subject)), "algebra_test.csv: no questions"),
    "eval_empty_dev_csv_with_shots": ("eval", lambda w, t: eval_args(w, "--shots", "5", data=bad_data_mmlu(
        w, t, lambda d: (d / "dev" / "algebra_dev.csv").write_text(""))), "0 exemplar rows, --shots 5"),
    # tracebacks before
    "train_out_is_a_file": ("train", lambda w, t: train_args(w, write(t / "f", "x")), "is a file, not a folder"),
    "train_out_under_a_file": ("train", lambda w, t: train_args(w, write(t / "f", "x") / "run"), "not a directory"),
    "train_garbage_ckpt": ("train", lambda w, t: resume_args_with(w, t, lambda o: write(o / "ckpt.pt", "garbage")),
                           "cannot be read"),
    "train_truncated_ckpt": ("train", lambda w, t: resume_args_with(w, t, lambda o: truncate(o / "ckpt.pt")), "cannot be read"),
    "train_config_json_a_list": ("train", lambda w, t: train_args(w, t / "o", model=bad_model(
        w, t, lambda d: write(d / "config.json", "[1, 2]"))), "a JSON list"),
    "train_config_field_type": ("train", lambda w, t: train_args(w, t / "o", model=bad_model(
        w, t, lambda d: edit_json(d / "config.json", lambda c: c.update(hidden_size="64")))), "hidden_size is '64'"),
    "train_meta_json_a_list": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(
        w, t, lambda d: write(d / "meta.json", "[]"))), "a JSON list"),
    "train_meta_field_type": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(
        w, t, lambda d: edit_json(d / "meta.json", lambda m: m.update(vocab_size="420")))), "wrong type"),
    "train_tokenizer_json_a_list": ("train", lambda w, t: train_args(w, t / "o", model=bad_model(
        w, t, lambda d: write(d / "tokenizer.json", "[]"))), "tokenizer.json"),
    "train_tokenizer_json_field_type": ("train", lambda w, t: train_args(w, t / "o", model=bad_model(
        w, t, lambda d: edit_json(d / "tokenizer.json", lambda j: j["model"].update(vocab=[1, 2])))), "unexpected structure"),
    "eval_tokenizer_json_field_type": ("eval", lambda w, t: eval_args(w, model=bad_model(
        w, t, lambda d: edit_json(d / "tokenizer.json", lambda j: j["model"].update(vocab=[1, 2])))), "unexpected structure"),
    "train_val_token_beyond_vocab": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(w, t, val_beyond_vocab)),
                                     "embeds only"),
    "eval_adapter_json_a_list": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(
        w, t, lambda d: write(d / "adapter.json", "[]"))), "a JSON list"),
    "eval_adapter_json_field_type": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(
        w, t, lambda d: edit_json(d / "adapter.json", lambda m: m["config"].update(r="4")))), "r is '4', of the wrong type"),
    "eval_truncated_adapter_safetensors": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(
        w, t, lambda d: truncate(d / "adapter.safetensors"))), "truncated or corrupt"),
    "eval_out_is_a_folder": ("eval", lambda w, t: eval_args(w, "--out", t), "is a folder"),
    "model_truncated_safetensors": ("model", lambda w, t: ["--model", str(bad_model(
        w, t, lambda d: truncate(d / "model.safetensors"))), "--prompt", "hi"], "truncated or corrupt"),
    "adapters_config_json_a_list": ("adapters", lambda w, t: ["--model", str(write(t / "config.json", "[]"))], "a JSON list"),
    # cryptic lines before
    "train_meta_json_invalid": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(
        w, t, lambda d: write(d / "meta.json", '{"format": '))), "meta.json: not valid JSON"),
    "eval_adapter_json_invalid": ("eval", lambda w, t: eval_args(w, "--adapter", bad_adapter(
        w, t, lambda d: write(d / "adapter.json", "{"))), "adapter.json: not valid JSON"),
    "train_bin_not_multiple_of_4": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(
        w, t, lambda d: open(d / "train.bin", "ab").write(b"\x01"))), "train.bin: "),
    "train_garbage_idx_npy": ("train", lambda w, t: train_args(w, t / "o", data=bad_data(w, t, npy_garbage)),
                              "train.idx.npy: not a readable .npy"),
    "eval_csv_not_utf8": ("eval", lambda w, t: eval_args(w, data=bad_data_mmlu(w, t, latin1_csv)), "algebra_test.csv: not UTF-8"),
    "eval_gsm8k_jsonl_not_utf8": ("eval", lambda w, t: eval_args(w, "--task", "gsm8k", data=write_bytes(
        t / "test.jsonl", '{"question": "Caf\u00e9?", "answer": "#### 1"}\n'.encode("utf-16"))), "test.jsonl: not UTF-8"),
    "eval_gsm8k_jsonl_bad_line": ("eval", lambda w, t: eval_args(w, "--task", "gsm8k", data=write(
        t / "test.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n{"question": \n')), "test.jsonl, line 2"),
    "eval_bbh_task_a_list": ("eval", lambda w, t: eval_args(w, "--task", "bbh", data=write(
        t / "bbh" / "dates.json", "[]").parent), "dates.json: a JSON list"),
    "eval_categories_json_invalid": ("eval", lambda w, t: eval_args(w, data=bad_data_mmlu(
        w, t, lambda d: write(d / "categories.json", "{"))), "categories.json: not valid JSON"),
    "prepare_jsonl_not_utf8": ("prepare", lambda w, t: ["jsonl", "--model", str(w["model"]), "--out", str(t / "o"),
                                                        "--input", str(write_bytes(t / "in.jsonl", '{"instruction": "Caf\u00e9", "output": "x"}\n'.encode("latin-1")))],
                               "in.jsonl: not UTF-8"),
    "prepare_out_is_a_file": ("prepare", lambda w, t: ["synthetic", "--model", str(w["model"]), "--out", str(write(t / "f", "x"))],
                              "is a file, not a folder"),
    "prepare_out_is_the_model_folder": ("prepare", lambda w, t: ["synthetic", "--model", str(w["model"]),
                                                                 "--out", str(w["model"])], "holds a model checkpoint"),
    "prepare_tokenizer_json_a_list": ("prepare", lambda w, t: ["synthetic", "--model", str(bad_model(
        w, t, lambda d: write(d / "tokenizer.json", "[]"))), "--out", str(t / "o")], "tokenizer.json"),
}


def write(f, text):
    Path(f).parent.mkdir(parents=True, exist_ok=True)
    Path(f).write_text(text)
    return Path(f)


def write_bytes(f, b):
    Path(f).write_bytes(b)
    return Path(f)


def bad_data_mmlu(w, t, change):
    return changed_copy(w["mmlu"], t / "mmlu", change)


def resume_args_with(w, t, change):
    return train_args(w, changed_copy(w["run"], t / "run", change), "--resume")



def mkdir(d):
    d.mkdir()
    return d


def remove(d, name):
    (d / name).unlink()
    return d


@pytest.mark.parametrize("case", CASES)
def test_every_command_line_gives_one_line_and_changes_nothing(w, tmp_path, capsys, case):
    cli, make, want = CASES[case]
    argv = make(w, tmp_path)
    before = snapshot(w["root"], tmp_path)
    capsys.readouterr()
    try:
        code, err = call(cli, argv, capsys)
    finally:
        while hold_lock.fds:
            os.close(hold_lock.fds.pop())
    line = one_error_line(err)
    assert code == 1 and want in line, line
    assert snapshot(w["root"], tmp_path) == before


# -----------------------------------------------------------------------------
# classes that take more than one call


@pytest.mark.parametrize("case", ["missing_weight", "mistyped_flag"])
def test_under_torchrun_bad_input_is_one_line_and_status_1(w, tmp_path, case):
    """Two processes, one error line: a mistyped flag (argparse, before anything else) and a weight missing from the
    checkpoint, found while loading after init_process_group. train.py leaves a torchrun process by os._exit
    (train.exit_without_teardown): the status 1 must survive it (every other torchrun test is a success: 0)."""
    def drop_final_norm(d):
        sd = load_file(d / "model.safetensors")
        del sd["model.norm.weight"]
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if case == "missing_weight":
        args, want = train_args(w, tmp_path / "run", model=bad_model(w, tmp_path, drop_final_norm)), "model.norm.weight"
    else:
        args, want = train_args(w, tmp_path / "run", "--lerning_rate", "1e-4"), "unrecognized arguments: --lerning_rate"
    p = torchrun(args, status=1)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]  # torchrun adds its own report
    assert len(errors) == 1 and want in errors[0], p.stderr[-3000:]


@pytest.mark.parametrize("body,status,stderr", [("print('kept')", 0, ""), ("sys.exit(3)", 3, ""),
                                                 ("sys.exit()", 0, ""), ("sys.exit('why')", 1, "why\n")])
def test_exit_without_teardown_keeps_the_status_and_the_buffered_output(body, status, stderr):
    """train.py's way out of a torchrun process (os._exit): Python's exit status for each form of sys.exit, and what
    was printed but still sat in stdout's buffer (a pipe is block-buffered) reaches the reader."""
    code = f"import sys, train\ndef run():\n    print('kept')\n    {body}\ntrain.exit_without_teardown(run)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in most shells
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (status, "kept\n" * (1 + (body == "print('kept')")), stderr)


def run_dir(w, t, name="run"):
    return copy(w["run"], t / name)


def test_a_live_claim_on_out_is_refused_and_a_killed_ones_is_not(w, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()} on here'.encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = call("train", train_args(w, out), capsys)
        assert code == 1 and f"pid {holder.pid} on here" in one_error_line(err)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    code, _ = call("train", train_args(w, out), capsys)
    assert code == 0 and (out / "adapter.safetensors").is_file()


def test_overwrite_replaces_a_finished_run(w, tmp_path, capsys):
    out = run_dir(w, tmp_path)
    code, _ = call("train", train_args(w, out, "--max_steps", "3", "--overwrite"), capsys)
    assert code == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]  # the new run's log only
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3


def test_weights_fingerprint_tells_a_base_from_its_finetuned_variant(w, tmp_path):
    fp = weights_fingerprint(w["model"])
    same = copy(w["model"], tmp_path / "same")
    assert weights_fingerprint(same) == fp
    # the same weights in three shards: the same fingerprint (it hashes tensors, not files)
    hf = make_hf_checkpoint(tmp_path / "shards", "llama3", tokenizer="json", initializer_range=0.2, max_shard_size="60KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "shards") == fp
    # a fine-tune moves every weight a little: another fingerprint
    tuned = tmp_path / "tuned"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(str(tuned), safe_serialization=True)
    assert weights_fingerprint(tuned) != fp
    # and an adapter records it: it loads onto the same weights, and refuses the variant
    model = Transformer.from_pretrained(same)
    adapters.load_adapter(model, w["run"])
    with pytest.raises(ValueError, match="same shapes, other weights"):
        adapters.load_adapter(Transformer.from_pretrained(tuned), w["run"])


def test_ctrl_c_names_the_checkpoint_and_the_resume_command_and_resume_is_exact(w, tmp_path, capsys, monkeypatch):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = ["--max_steps", "5", "--save_every", "2", "--dropout", "0.1"]
    assert call("train", base_args(w["model"], w["data"], straight, *common), capsys)[0] == 0
    get_lr = train.get_lr

    def ctrl_c_at_step_3(it, *a):  # where SIGINT's KeyboardInterrupt lands: mid-run, after the step-2 checkpoint
        if it == 3:
            raise KeyboardInterrupt
        return get_lr(it, *a)
    monkeypatch.setattr(train, "get_lr", ctrl_c_at_step_3)
    argv = base_args(w["model"], w["data"], cut, *common)
    code, err = call("train", argv, capsys)
    line = error_line_after_progress(err)
    assert code == 1 and f"{cut / 'ckpt.pt'} holds step 2" in line and "interrupted (Ctrl-C) at step 3" in line
    monkeypatch.setattr(train, "get_lr", get_lr)
    command = line.split("continue with: python train.py ", 1)[1]
    import shlex
    assert call("train", shlex.split(command), capsys)[0] == 0  # the printed command, as printed
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_during_a_checkpoint_write_keeps_the_last_one(w, tmp_path, capsys):
    out = tmp_path / "run"
    assert call("train", train_args(w, out, "--max_steps", "4", "--stop_after", "2"), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    # The file-size limit makes the kernel fail every write past it (EFBIG), as a full disk fails with ENOSPC:
    # the checkpoint is the one file that large.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        code, err = call("train", train_args(w, out, "--max_steps", "4", "--resume"), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    line = error_line_after_progress(err)
    assert code == 1 and "writing the checkpoint of step 4 failed" in line and "of step 2 is kept" in line, line
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob(".*tmp*"))  # no half-written temporary file left
    assert call("train", train_args(w, out, "--max_steps", "4", "--resume"), capsys)[0] == 0  # and it goes on


def test_a_torn_last_metrics_line_does_not_block_resume(w, tmp_path, capsys):
    out = tmp_path / "run"
    assert call("train", train_args(w, out, "--max_steps", "3", "--stop_after", "2"), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.1, "l')  # a kill in the middle of a write
    assert call("train", train_args(w, out, "--max_steps", "3", "--resume"), capsys)[0] == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]


def test_temporary_files_of_killed_writes_are_swept(w, tmp_path, capsys):
    out = run_dir(w, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".ckpt.pt.tmp{int(dead.stdout)}"  # a process that no longer exists
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    live = out / f".adapter.json.tmp{writer.pid}"  # a live process's write in flight: left alone
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    try:
        assert call("train", train_args(w, out, "--resume"), capsys)[0] == 0
    finally:
        writer.kill()
        writer.wait()
    assert not stale.exists() and live.exists()


def test_ctrl_c_in_the_other_commands_is_one_line_too(w, tmp_path, capsys, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_mmlu, "tail_logits", ctrl_c)
    out = tmp_path / "results.json"
    code, err = call("eval", eval_args(w, "--out", out), capsys)
    assert code == 1 and "interrupted (Ctrl-C)" in one_error_line(err) and not out.exists()
