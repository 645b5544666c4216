"""
checkpoint.py -- train.py's run folder (--out) and its checkpoint: what OUT holds, how a run holds it, how a
run resumes from it exactly.

OUT holds (RUN_FILES, and the lock):
  ckpt.pt              the state to resume from: step, the adapter's parameters (whole tensors, as one process
                       saves them, under DDP and FSDP alike), AdamW's and GradScaler's state, each process's RNG
                       state, the world size, and the run's id (the settings that shape the weights, the base's
                       shapes and weights fingerprint, the tokenizer, the data's content fingerprint)
  metrics.jsonl        every logged number, one JSON record a line (step 0: the run's sizes)
  run.json             the run's id and its runtime settings
  adapter.safetensors, adapter.json   the trained adapter (adapters.py's format); with --adapter none the
                       whole model instead, as a Hugging Face checkpoint in OUT/model (save_hf_checkpoint)
  .lock                the run's claim: "pid P on HOST"
Guarantees:
  - exclusive: a run holds OUT with an flock on OUT/.lock (OutClaim) from its checks to its end; the kernel
    drops it when the process dies, however it dies, so a killed run never blocks the next one.
  - never overwritten without --overwrite: train.py refuses a fresh start into a folder that holds any of
    RUN_FILES; check_paths refuses --merge_out onto the base or onto another checkpoint.
  - atomic writes: each file goes to a temporary name and is renamed into place (model.write_atomic), so a kill
    or a full disk leaves the old file or the new one, never half of one; sweep_tmp removes the temporaries of
    killed processes.
  - exact resume: load_checkpoint refuses a damaged or foreign ckpt.pt in one line, check_same_run one made
    with other settings, base weights or data; trim_metrics drops what was logged after the checkpoint.
"""

import errno
import fcntl
import json
import os
import re
import shutil
import socket
from pathlib import Path

import torch

from model import write_atomic


# train.py's one error for bad input (train.TrainError): here, the lowest module that raises it
class TrainError(ValueError):
    """Bad input or a failed run: one line naming the problem and the fix."""


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "run.json", "adapter.safetensors", "adapter.json", "model")  # what a run writes


class OutClaim:
    """This run's exclusive hold on OUT: an flock on OUT/.lock, which holds "pid P on HOST" for the message. The
    kernel drops the lock when its process dies, however it dies (a SIGKILL, a lost node), so a killed run's
    claim is never mistaken for a live one and nothing has to be cleaned up by hand. The file stays."""

    def __init__(self):
        self.fd, self.made, self.made_lock, self.out = None, False, False, None
        self.step, self.saved_step, self.bar = 0, None, None

    def take(self, out):
        self.out = Path(out)
        self.made = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        lock = self.out / ".lock"
        self.made_lock = not lock.exists()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = lock.read_text().strip() or "another process"
            raise TrainError(f"--out {out} is in use by a running train.py ({holder}): wait for it to end, or choose "
                             f"another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self):
        if self.bar is not None:  # end the progress bar's line before an error line is printed under it
            self.bar.close()
        if self.fd is None:
            return
        if self.made_lock and not any((self.out / f).exists() for f in RUN_FILES):  # refused before writing anything
            (self.out / ".lock").unlink(missing_ok=True)
            if self.made and not any(self.out.iterdir()):
                self.out.rmdir()
        os.close(self.fd)  # drops the flock
        self.fd = None


def sweep_tmp(folder):
    """Remove temporary files (model.write_atomic's .NAME.tmpPID) left in folder by killed processes of this host."""
    for f in Path(folder).glob(".*.tmp*"):
        m = re.fullmatch(r"\..+\.tmp(\d+)", f.name)
        if m and f.is_file() and not pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_paths(cfg, model_dir, out):
    """--out must be a folder (or not exist yet); --merge_out must not be the base, nor another checkpoint
    unless --overwrite says so."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder: choose a folder for the run")
    if cfg.merge_out:
        m = Path(cfg.merge_out)
        if any(a.exists() and not a.is_dir() for a in (m, *m.parents)):  # refused now, not after training
            raise TrainError(f"--merge_out {m}: it or a folder above it is a file: choose a new folder")
        if m.resolve() == model_dir.resolve():
            raise TrainError(f"--merge_out {m} is the --model folder: the base would be overwritten by the merged "
                             f"weights; choose a new folder")
        if (m / "model.safetensors").exists() or (m / "config.json").exists():
            if not cfg.overwrite:
                raise TrainError(f"--merge_out {m} already holds a checkpoint: pass --overwrite to replace it, or "
                                 f"choose a new folder")


def load_checkpoint(path):
    """OUT/ckpt.pt, or one line saying it cannot be used (torch raises many types for a damaged file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (zip), UnpicklingError, EOFError, ...: all mean "damaged"
        raise TrainError(f"{path}: cannot be read, truncated or corrupt ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:80]}): restore it from a copy, or start again with --overwrite") from None
    keys = {"step", "run", "world_size", "param_names", "params", "optimizer", "scaler", "rng"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        raise TrainError(f"{path}: not a train.py checkpoint (it lacks {sorted(keys - set(ckpt)) if isinstance(ckpt, dict) else 'everything'}): "
                         f"restore it from a copy, or start again with --overwrite")
    return ckpt


# What a mismatch of these run-id fields means, said in words.
RUN_ID_HINTS = {"base_weights": "--model has other weights than the run's base (same shapes)",
                "data_content": "--data has other content than the run's data"}


def check_same_run(saved, now, ckpt_path):
    """Resuming needs the settings that shape the weights to be the ones the checkpoint was made with."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and prefix == "":
                yield from flat(v, k + ".")
            else:
                yield prefix + k, v
    a, b = dict(flat(saved)), dict(flat(now))
    for k in sorted(set(a) | set(b)):
        if k in RUN_ID_HINTS and k not in a:  # a checkpoint written before the content fingerprints existed
            continue
        if a.get(k) != b.get(k):
            why = f" ({RUN_ID_HINTS[k]})" if k in RUN_ID_HINTS else ""
            raise TrainError(f"{ckpt_path} was made with {k}={a.get(k)!r} but this run has {k}={b.get(k)!r}{why}: "
                             f"resume with the same settings, or start a new run in another --out")


def trim_metrics(path, step):
    """A killed run may have logged steps after its last checkpoint, the last line perhaps torn mid-write:
    drop them before continuing."""
    def step_of(line):
        try:
            rec = json.loads(line)
            return rec["step"] if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None
        except ValueError:
            return None
    if path.is_file():
        lines = [(line, step_of(line)) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        keep = [line for line, s in lines if s is not None and s <= step]
        if torn := sum(s is None for _, s in lines):
            print(f"note: {path}: dropped {torn} unreadable line(s) (a write cut by the kill)", flush=True)
        write_atomic(path, lambda f: f.write_text("".join(line + "\n" for line in keep)))


def write_checkpoint(ckpt_path, state, saved_step):
    """Write state (a dict with "step") to ckpt_path atomically, or one line saying what is kept: the checkpoint
    of saved_step (None: no checkpoint yet) stays whole when the write fails."""
    step = state["step"]
    try:
        write_atomic(ckpt_path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # a full disk: torch's zip writer raises RuntimeError
        kept = f"{ckpt_path} of step {saved_step} is kept" if saved_step is not None else "no checkpoint was kept"
        raise TrainError(f"{ckpt_path}: writing the checkpoint of step {step} failed "
                         f"({' '.join(str(e).split())[:120]}): {kept}; free disk space and run again"
                         f"{' with --resume' if saved_step is not None else ' with --overwrite'}") from None


def save_hf_checkpoint(model, source_dir, dest):
    """Transformer.save_pretrained + the source folder's tokenizer files, written to dest.tmp then renamed,
    so `Transformer.from_pretrained(dest)` and transformers load it like any Hub checkpoint."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
