"""
prepare_data.py -- instruction data in, compact token/mask files out (the format train.py reads).

Recipes, one per dataset the MASA paper (Dong et al., 2025) fine-tunes on, plus two generic ones:
    dolly     databricks-dolly-15k (evaluated on MMLU)
    gsm8k     GSM8K train split (Cobbe et al., 2021)
    openorca  OpenOrca, GPT-4 completions (evaluated on BBH)
    lawyer    Lawyer-Instruct        } law; evaluated on MMLU's law subjects
    usterms   LegalLAMA US-Terms     }
    fineval   FinGPT fineval (Chinese finance multiple choice)
    jsonl     any JSON Lines / JSON array with a field mapping (--instruction_field ...)
    synthetic the offline demo set: several made-up tasks, deterministic from --seed, plus held-out
              multiple-choice items written as MMLU-style CSVs (OUT/mmlu) that eval_mmlu.py scores.
    synthetic_pretrain  plain text teaching the synthetic tasks' skills (sums, maxima, reversals, the
              world's facts) to pretrain the demo's base from scratch; no multiple-choice format, no
              held-out problem. `synthetic.write_bpe_tokenizer` trains the demo's tokenizer.json on it.
    synthetic_quiz  generic multiple-choice quizzes (which option is a number, a name, in capitals, ...)
              that share no question with the synthetic tasks: the demo base's second pretraining
              stage, which teaches the answer-letter format (see synthetic_quiz_records).
The three synthetic recipes draw their made-up world (task generators, held-out split, pretraining text,
quiz items) from synthetic.py; this file renders it into records and writes the files.

Every example is rendered with ONE prompt template (PROMPT_TEMPLATE below, the Alpaca template that
alpaca-lora / HydraLoRA use), tokenised with the model's own tokenizer (model.Tokenizer) as
    [BOS] + encode(prompt) + encode(response) + [EOS]
and masked so that the loss falls on the response and EOS only. Prompt and response are encoded
separately, so the mask boundary is exact whatever the BPE merges would do across it.

Output (docs/data.md, "Data format"): OUT/meta.json, OUT/{train,val}.bin (uint32 ids),
OUT/{split}.mask.bin (uint8, 1 = response token), OUT/{split}.idx.npy (int64 offsets, examples+1),
OUT/{split}.task.npy (int32 task id per example, multi-task recipes only). Every file is written to a
temporary name and renamed into place; meta.json goes last, so its presence means the set is complete.

Run:
    python prepare_data.py dolly --model DIR --out data/dolly                 # downloads when online
    python prepare_data.py gsm8k --model DIR --input train.jsonl --out data/gsm8k
    python prepare_data.py jsonl --model DIR --input my.jsonl --instruction_field q --output_field a --out d
    python prepare_data.py synthetic --model DIR --out data/synthetic --seed 0
"""
import csv
import json
import os
import random
import shutil
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from synthetic import (SYNTHETIC_CATEGORIES, SYNTHETIC_DEFAULT, SYNTHETIC_OPEN_FORM, mc_rows, quiz_item, split_pool,
                       synthetic_heldout, synthetic_pretrain_texts, synthetic_tasks)

# -----------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    recipe: str = ""                # one of RECIPES, or several joined by commas (also the first positional argument)
    out: str = ""                   # output directory
    model: str = ""                 # model (or tokenizer) directory: only its tokenizer files are read
    input: Optional[str] = None     # local copy: .jsonl, .json array or .parquet (comma list for several recipes)
    cutoff: int = 1024              # max tokens per example (BOS..EOS); longer examples are cut
    val_frac: float = 0.1           # fraction of examples held out for validation (seeded)
    seed: int = 0                   # seeds the validation split, --max_examples and the synthetic set
    max_examples: int = 0           # keep a seeded random subset of this many records (0 = all)
    cache_dir: str = "~/.cache/nanomasa"  # where downloads are kept
    instruction_field: str = "instruction"  # jsonl recipe: field holding the instruction
    input_field: str = "input"      # jsonl recipe: optional field holding extra context ("" if absent)
    output_field: str = "output"    # jsonl recipe: field holding the response
    task_field: Optional[str] = None  # jsonl recipe: optional field naming each record's task
    syn_tasks: str = ",".join(SYNTHETIC_DEFAULT)  # synthetic: comma-separated tasks (synthetic.SYNTHETIC_TASKS)
    syn_train: int = 1000           # synthetic: training problems per task
    syn_test: int = 100             # synthetic: held-out multiple-choice test items per task
    syn_mc_train: bool = True       # synthetic: also train on MMLU-format MC items (like MMLU's auxiliary_train)
    syn_open_form: bool = True      # synthetic: also train on the open-form instructions (question -> answer)
    syn_quiz: int = 60000           # synthetic_quiz: number of quiz items


class DataError(ValueError):
    """Bad input: one line naming the problem and the fix."""


# -----------------------------------------------------------------------------
# the prompt template (shared with eval_mmlu.py's generation tasks and with generation in general)

TEMPLATE_NAME = "alpaca"
PROMPT_TEMPLATE = {
    # Taori et al. 2023 (Stanford Alpaca), as used by alpaca-lora and HydraLoRA's fine-tuning scripts.
    "with_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"),
}


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt for one example; the response follows it directly (no space, it ends in a newline)."""
    if input:
        return PROMPT_TEMPLATE["with_input"].format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE["no_input"].format(instruction=instruction)


def parse_prompt(prompt: str):
    """Inverse of format_prompt: prompt text -> (instruction, input). Raises DataError if it does not match.
    (Ambiguous only if an instruction itself contains the "### Input:" separator.)"""
    for key in ("with_input", "no_input"):
        head, _, rest = PROMPT_TEMPLATE[key].partition("{instruction}")
        if not prompt.startswith(head):
            continue
        body = prompt[len(head):]
        if key == "with_input":
            mid, _, tail = rest.partition("{input}")
            if mid in body and body.endswith(tail):
                instruction, _, inp = body[:len(body) - len(tail)].partition(mid)
                if format_prompt(instruction, inp) == prompt:
                    return instruction, inp
        elif body.endswith(rest) and format_prompt(body[:len(body) - len(rest)]) == prompt:
            return body[:len(body) - len(rest)], ""
    raise DataError("text does not follow PROMPT_TEMPLATE")


# -----------------------------------------------------------------------------
# the MMLU prompt, exactly as hendrycks/test builds it (eval_mmlu.py scores it; the demo's quiz records use it)

LETTERS = "ABCD"


def format_subject(subject):
    # a space BEFORE each word: "abstract_algebra" -> " abstract algebra" (hence two spaces in the header)
    return "".join(" " + w for w in subject.split("_"))


def format_example(row, include_answer=True):
    s = row[0]
    for letter, option in zip(LETTERS, row[1:5]):
        s += f"\n{letter}. {option}"
    s += "\nAnswer:"
    return s + (f" {row[5]}\n\n" if include_answer else "")


def mmlu_prompt(subject, dev_rows, row):
    """Header + every row of dev_rows as an answered exemplar + the question, ending in "Answer:"."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_example(r) for r in dev_rows) + format_example(row, include_answer=False)


# -----------------------------------------------------------------------------
# reading raw files: rows with their line numbers, malformed ones counted


class Malformed:
    """Counts malformed records and remembers the earliest one in the file (where and why)."""

    def __init__(self):
        self.n, self.first, self._at = 0, None, None

    def add(self, where, why):  # where: "line N" or "record N"
        self.n += 1
        at = int(where.rsplit(" ", 1)[1])
        if self._at is None or at < self._at:
            self.first, self._at = f"{where}: {why}", at

    def __str__(self):
        return f"{self.n} malformed record(s)" + (f", first at {self.first}" if self.n else "")


def read_rows(path, bad: Malformed):
    """Rows of a .jsonl / .json (array) / .parquet file as a list of (where, dict). `where` is 'line N'
    (1-based) for JSON Lines and 'record N' otherwise. Unparsable lines are counted in `bad`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found: pass --input FILE with a local copy")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only OpenOrca / fineval are published as parquet
        except ImportError:
            raise DataError(f"{path} is parquet: `pip install pyarrow`, or convert it to JSON Lines") from None
        return [(f"record {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8") from None
    if text.lstrip().startswith("["):  # one JSON array (Lawyer-Instruct ships this way)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        rows = []
        for i, r in enumerate(data):
            if isinstance(r, dict):
                rows.append((f"record {i + 1}", r))
            else:
                bad.add(f"record {i + 1}", "not a JSON object")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(f"line {i + 1}", f"invalid JSON ({e.msg})")
            continue
        if isinstance(r, dict):
            rows.append((f"line {i + 1}", r))
        else:
            bad.add(f"line {i + 1}", "not a JSON object")
    return rows


# -----------------------------------------------------------------------------
# recipes: where the data lives and how a raw row becomes {instruction, input, output, task}
# A converter raises KeyError / ValueError for a malformed row; a record may instead carry a ready
# "prompt" (the synthetic MC items), which then replaces format_prompt(instruction, input).


def _text(row, key, required=True):
    v = row.get(key)
    if v is None:
        if required:
            raise KeyError(key)
        return ""
    if not isinstance(v, str):
        raise ValueError(f"field '{key}' is {type(v).__name__}, not a string")
    return v


def _alpaca(row, cfg=None):  # instruction / input / output (Lawyer-Instruct, FinGPT fineval)
    return dict(instruction=_text(row, "instruction"), input=_text(row, "input", False), output=_text(row, "output"))


def _dolly(row, cfg=None):
    return dict(instruction=_text(row, "instruction"), input=_text(row, "context", False),
                output=_text(row, "response"), task=_text(row, "category", False) or None)


def _gsm8k(row, cfg=None):  # the worked solution, calculator annotations and "#### N" line kept verbatim
    return dict(instruction=_text(row, "question"), input="", output=_text(row, "answer"))


def _openorca(row, cfg=None):  # the system prompt (often empty) is part of what the model is asked
    system, question = _text(row, "system_prompt", False).strip(), _text(row, "question")
    return dict(instruction=f"{system}\n\n{question}" if system else question, input="", output=_text(row, "response"))


USTERMS_INSTRUCTION = "Fill in the <mask> in the following legal text with the correct U.S. legal term."


def _usterms(row, cfg=None):  # LegalLAMA cloze item -> instruction format; the label is the answer
    sentences = row["masked_sentences"]
    if not isinstance(sentences, list) or len(sentences) != 1 or not isinstance(sentences[0], str):
        raise ValueError("'masked_sentences' is not a list of one string")
    return dict(instruction=USTERMS_INSTRUCTION, input=sentences[0], output=_text(row, "obj_label"))


def _jsonl(row, cfg):
    task = _text(row, cfg.task_field, False) if cfg.task_field else None
    return dict(instruction=_text(row, cfg.instruction_field), input=_text(row, cfg.input_field, False),
                output=_text(row, cfg.output_field), task=task or None)


@dataclass
class Recipe:
    url: Optional[str]   # public copy (None: no download; --input required, or generated)
    convert: object      # row dict -> record dict
    fields: tuple = ()   # fields that must exist in at least one row (else: a mapping problem, not bad rows)


HF = "https://huggingface.co/datasets"
RECIPES = {
    "dolly": Recipe(f"{HF}/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
                    _dolly, ("instruction", "response")),
    "gsm8k": Recipe("https://raw.githubusercontent.com/openai/grade-school-math/master/"
                    "grade_school_math/data/train.jsonl", _gsm8k, ("question", "answer")),
    "openorca": Recipe(f"{HF}/Open-Orca/OpenOrca/resolve/main/1M-GPT4-Augmented.parquet",
                       _openorca, ("question", "response")),
    "lawyer": Recipe(f"{HF}/Alignment-Lab-AI/Lawyer-Instruct/resolve/main/alpacmygavel.json",
                     _alpaca, ("instruction", "output")),
    "usterms": Recipe(f"{HF}/lexlms/legal_lama/resolve/main/us_terms.jsonl",
                      _usterms, ("masked_sentences", "obj_label")),
    "fineval": Recipe(f"{HF}/FinGPT/fingpt-fineval/resolve/main/data/train-00000-of-00001-1fa04e2cd84728f4.parquet",
                      _alpaca, ("instruction", "output")),
    "jsonl": Recipe(None, _jsonl),
    "synthetic": Recipe(None, None),
    "synthetic_pretrain": Recipe(None, None),
    "synthetic_quiz": Recipe(None, None),
}


def download(url, cache_dir):
    """Fetch url into cache_dir once (urllib + tqdm progress bar); return the local path."""
    dest = Path(cache_dir).expanduser() / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}): fetch it by hand and pass --input FILE") from None
    os.replace(tmp, dest)
    return dest


def load_records(cfg: DataConfig, bad: Malformed):
    """The recipe's records: list of {instruction, input, output, task?} (or {prompt, output, task}).
    Several recipes joined by commas (the paper's law set: "lawyer,usterms", with --input a,b when local)
    are concatenated, each recipe's name becoming its records' task."""
    if "," in cfg.recipe:
        names = cfg.recipe.split(",")
        inputs = cfg.input.split(",") if cfg.input else [None] * len(names)
        if len(inputs) != len(names):
            raise DataError(f"{len(names)} recipes but {len(inputs)} --input files: "
                            f"give one file per recipe, comma-separated")
        records = []
        for name, inp in zip(names, inputs):
            part = load_records(replace(cfg, recipe=name, input=inp), bad)
            records += [{**r, "task": name} for r in part]
        return records
    if cfg.recipe not in RECIPES:
        raise DataError(f"unknown recipe {cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[cfg.recipe]
    if cfg.recipe == "synthetic":
        tasks = synthetic_tasks(cfg.syn_tasks)
        if not (cfg.syn_mc_train or cfg.syn_open_form):
            raise DataError("--no-syn_mc_train with --no-syn_open_form leaves no training record: drop one of the two")
        if not cfg.syn_mc_train and not set(tasks) & set(SYNTHETIC_OPEN_FORM):
            raise DataError(f"--no-syn_mc_train leaves no training record for --syn_tasks {','.join(tasks)} (their "
                            f"questions need their options): drop it, or add one of {', '.join(SYNTHETIC_OPEN_FORM)}")
        return synthetic_records(cfg.seed, cfg.syn_train, cfg.syn_test, cfg.syn_mc_train, cfg.syn_open_form, tasks)
    if cfg.recipe == "synthetic_pretrain":
        return [dict(prompt="", output=t, task=None) for t in synthetic_pretrain_texts(cfg.seed, cfg.syn_train, cfg.syn_test)]
    if cfg.recipe == "synthetic_quiz":
        return synthetic_quiz_records(cfg.seed, cfg.syn_quiz)
    if cfg.input:
        path = cfg.input
    elif recipe.url:
        path = download(recipe.url, cfg.cache_dir)
    else:
        raise DataError(f"recipe {cfg.recipe!r} has no public copy to download: pass --input FILE")
    rows = read_rows(path, bad)
    fields = recipe.fields
    if cfg.recipe == "jsonl":
        fields = (cfg.instruction_field, cfg.output_field) + tuple(
            f for f, d in ((cfg.input_field, "input"), (cfg.task_field, None)) if f and f != d)
    for f in fields:  # a field absent from every row is a mapping problem, not a pile of bad rows
        if rows and not any(f in r for _, r in rows):
            flag = {"instruction": "--instruction_field", "input": "--input_field", "output": "--output_field"}
            hint = (next((flag[k] for k in flag if getattr(cfg, f"{k}_field") == f), None)
                    if cfg.recipe == "jsonl" else None)
            raise DataError(f"no record in {path} has the field '{f}' (first record's keys: "
                            f"{', '.join(rows[0][1])})" + (f": map yours with {hint} NAME" if hint else
                            f": is this really a {cfg.recipe} file? use the jsonl recipe with a field mapping"))
    records = []
    for where, row in rows:
        try:
            rec = recipe.convert(row, cfg)
        except KeyError as e:
            bad.add(where, f"missing field {e}")
            continue
        except ValueError as e:
            bad.add(where, str(e))
            continue
        if not rec["output"].strip():
            bad.add(where, "empty response")
            continue
        records.append(rec)
    return records


# -----------------------------------------------------------------------------
# tokenisation, masking, cutting, splitting


def tokenize_example(tok, rec, cutoff):
    """-> (ids, mask, was_cut). ids = [BOS] + prompt + response + [EOS]; mask 1 on response and EOS. [BOS]
    is what the checkpoint's tokenizer puts before a text (its post-processor: none for Qwen2 / SmolLM2);
    EOS always ends the response, so the model learns to stop."""
    prompt = rec["prompt"] if "prompt" in rec else format_prompt(rec["instruction"], rec.get("input", ""))
    p = tok.prefix + tok.encode(prompt)
    r = tok.encode(rec["output"]) + ([tok.eos_id] if tok.eos_id is not None else [])
    ids, mask = p + r, [0] * len(p) + [1] * len(r)
    cut = len(ids) > cutoff
    return ids[:cutoff], mask[:cutoff], cut


def write_atomic(path, write, mode="wb"):
    """write(f) into path.tmp, then rename over path. (model.write_atomic is the path-based twin; this one
    hands over an open file and keeps prepare_data importable without torch.)"""
    tmp = Path(f"{path}.tmp")
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        write(f)
    os.replace(tmp, path)


def write_split(out, split, examples, with_tasks):
    """examples: list of (ids uint32, mask uint8, task_id). Writes .bin/.mask.bin/.idx.npy(/.task.npy)."""
    lengths = np.array([len(e[0]) for e in examples], dtype=np.int64)
    idx = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)                   # (n+1,)
    ids = np.concatenate([e[0] for e in examples]) if examples else np.zeros(0, np.uint32)   # (tokens,)
    mask = np.concatenate([e[1] for e in examples]) if examples else np.zeros(0, np.uint8)   # (tokens,)
    write_atomic(out / f"{split}.bin", lambda f: ids.tofile(f))
    write_atomic(out / f"{split}.mask.bin", lambda f: mask.tofile(f))
    write_atomic(out / f"{split}.idx.npy", lambda f: np.save(f, idx))
    task_path = out / f"{split}.task.npy"
    if with_tasks:
        write_atomic(task_path, lambda f: np.save(f, np.array([e[2] for e in examples], dtype=np.int32)))
    else:
        task_path.unlink(missing_ok=True)  # a stale file from an earlier multi-task run would mislead
    return {"examples": len(examples), "tokens": int(idx[-1])}


def prepare(cfg: DataConfig, tok, log=print):
    """Python API: build cfg.recipe into cfg.out with tokenizer `tok`; returns the meta dict."""
    if not 0.0 <= cfg.val_frac < 1.0:
        raise DataError(f"--val_frac {cfg.val_frac} must be in [0, 1)")
    if cfg.cutoff < 2:
        raise DataError(f"--cutoff {cfg.cutoff} is too small: an example needs at least 2 tokens")
    if "synthetic" in cfg.recipe.split(","):
        check_ours(Path(cfg.out) / "mmlu")  # before anything is written
    bad = Malformed()
    records = load_records(cfg, bad)
    src = cfg.input or cfg.recipe
    if bad.n:
        log(f"skipped {bad}")
    if not records:
        raise DataError(f"no usable records in {src}" + (f" ({bad})" if bad.n else " (the file is empty)"))
    if cfg.max_examples and len(records) > cfg.max_examples:
        keep = sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.max_examples))
        records = [records[i] for i in keep]

    # multi-task when any record names a task; a record without one gets the task "(none)"
    tasks = sorted({r.get("task") or "(none)" for r in records}) if any(r.get("task") for r in records) else None
    task_id = {t: i for i, t in enumerate(tasks or [])}
    examples, n_cut, n_dropped = [], 0, 0
    for rec in tqdm(records, desc=f"tokenize {cfg.recipe}", unit="ex", disable=len(records) < 1000):
        ids, mask, cut = tokenize_example(tok, rec, cfg.cutoff)
        n_cut += cut
        if not any(mask):  # cut before the response began: nothing to learn from
            n_dropped += 1
            continue
        # numpy right away: a million examples as Python int lists would need ~10 GB
        examples.append((np.array(ids, np.uint32), np.array(mask, np.uint8),
                         task_id.get(rec.get("task") or "(none)", -1)))
    if n_cut:
        log(f"cut {n_cut} of {len(records)} examples at --cutoff {cfg.cutoff} tokens"
            + (f"; dropped {n_dropped} of them whose response started beyond the cutoff" if n_dropped else ""))
    if not examples:
        raise DataError(f"every example of {src} was cut before its response: raise --cutoff (now {cfg.cutoff})")

    # seeded validation split; each split keeps the original order (train.py shuffles)
    n = len(examples)
    n_val = min(max(1, round(n * cfg.val_frac)), n - 1) if cfg.val_frac > 0 and n > 1 else 0
    perm = np.random.default_rng(cfg.seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # until the new meta.json lands, the set is incomplete
    splits = {s: write_split(out, s, [e for e, v in zip(examples, is_val) if v == (s == "val")], tasks is not None)
              for s in ("train", "val")}
    meta = {"format": "nanomasa-sft-v1", "tokenizer": tok.fingerprint, "vocab_size": tok.n_vocab,
            "cutoff": cfg.cutoff, "template": TEMPLATE_NAME, "recipe": cfg.recipe, "splits": splits,
            "tasks": tasks, "n_cut": n_cut, "n_malformed": bad.n}
    if "synthetic" in cfg.recipe.split(","):
        meta["synthetic"] = synthetic_settings(cfg)
        write_mmlu_folder(out / "mmlu", synthetic_heldout(cfg.seed, cfg.syn_train, cfg.syn_test, cfg.syn_tasks))
    write_atomic(out / "meta.json", lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    log(f"wrote {out}: train {splits['train']['examples']} examples / {splits['train']['tokens']} tokens, "
        f"val {splits['val']['examples']} / {splits['val']['tokens']}")
    return meta


def read_split(data_dir, split):
    """Read back one split: -> (ids uint32, mask uint8, idx int64, task int32 or None). For tests/tools."""
    d = Path(data_dir)
    ids = np.fromfile(d / f"{split}.bin", dtype=np.uint32)
    mask = np.fromfile(d / f"{split}.mask.bin", dtype=np.uint8)
    idx = np.load(d / f"{split}.idx.npy")
    task = np.load(d / f"{split}.task.npy") if (d / f"{split}.task.npy").exists() else None
    return ids, mask, idx, task


# -----------------------------------------------------------------------------
# synthetic: synthetic.py's made-up world (the offline demo's tasks, issue 7) turned into records and files:
# the training records and quizzes rendered with mmlu_prompt, the held-out items as an MMLU folder.


def synthetic_settings(cfg):
    """What decides a synthetic set's items (recorded in meta.json; a cache with other settings is stale)."""
    return {"seed": cfg.seed, "tasks": list(synthetic_tasks(cfg.syn_tasks)), "train": cfg.syn_train,
            "test": cfg.syn_test, "mc_train": cfg.syn_mc_train, "open_form": cfg.syn_open_form}


def synthetic_records(seed: int = 0, n_train: int = 1000, n_test: int = 100, mc_train: bool = True,
                      open_form: bool = True, tasks=SYNTHETIC_DEFAULT):
    """THE hook the offline demo calls: training records for every synthetic task, deterministic from
    seed. With open_form each training problem gives an open-form record {instruction, input "", output,
    task} (only addition / maximum / reverse / world: the other questions need their options); with
    mc_train an MMLU-format multiple-choice record {prompt, output " X", task} rendered by
    mmlu_prompt (zero-shot), i.e. what MMLU's auxiliary_train is to MMLU. Held-out problems
    (synthetic_heldout) never appear; world facts do, in their open-form wording (see synthetic._world)."""
    records = []
    for task in synthetic_tasks(tasks):
        rng = random.Random(f"nanomasa-mc-train-{seed}-{task}")
        dev, test, train = split_pool(seed, task, n_train, n_test)
        for p in train + [q for q in dev + test if q.fact]:
            if open_form and p.open_form:
                records.append(dict(instruction=p.fact or p.question, input="", output=p.answer, task=task))
        if mc_train:
            for row in mc_rows(rng, train):
                records.append(dict(prompt=mmlu_prompt(task, [], row), output=" " + row[5], task=task))
    return records


def check_ours(mmlu):
    """OUT/mmlu is replaced only when this script wrote it (its categories.json says so): --out pointing at a
    folder whose mmlu/ is the real MMLU must not delete it."""
    ours = Path(mmlu) / "categories.json"
    if Path(mmlu).exists() and not (ours.is_file() and '"nanoMASA synthetic set"' in ours.read_text(errors="replace")):
        raise DataError(f"{mmlu} exists and was not written by prepare_data.py: move it away, or choose another --out")


def write_mmlu_folder(out, heldout):
    """Write {dev,test}/<task>_<split>.csv (no header, MMLU column order) and categories.json into a
    temporary folder, then put it in place of `out` (so no CSV of an earlier task choice survives)."""
    out = Path(out)
    check_ours(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, by_task in heldout.items():
        (tmp / split).mkdir(parents=True)
        for task, rows in by_task.items():
            with open(tmp / split / f"{task}_{split}.csv", "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    tasks = sorted(next(iter(heldout.values())))
    cats = {c: [t for t in ts if t in tasks] for c, ts in SYNTHETIC_CATEGORIES.items() if set(ts) & set(tasks)}
    table = {"_source": "nanoMASA synthetic set", "subcategories": {t: [t] for t in tasks},
             "categories": cats, "subject_to_category": {t: c for c, ts in cats.items() for t in ts}}
    (tmp / "categories.json").write_text(json.dumps(table, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def synthetic_quiz_records(seed: int = 0, n: int = 60000):
    """-> n MMLU-format quiz records {prompt, output " X", task None}, deterministic from seed; four distinct
    options, the answer's letter uniform over A-D. (The base's second pretraining stage: see synthetic.py.)"""
    rng = random.Random(f"nanomasa-quiz-{seed}")
    records = []
    while len(records) < n:
        q, a, d = quiz_item(rng)
        if len({a, *d}) < 4:
            continue
        k = rng.randrange(4)
        row = [q, *d[:k], a, *d[k:], "ABCD"[k]]
        records.append(dict(prompt=mmlu_prompt("quiz", [], row), output=" " + row[5], task=None))
    return records


# -----------------------------------------------------------------------------
# command line


def load_tokenizer(path):
    """model.Tokenizer from a model or tokenizer directory."""
    from model import Tokenizer
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path} is not a directory: point it at the model (or tokenizer) folder")
    return Tokenizer.from_pretrained(path)


def parse_args(argv=None) -> DataConfig:
    from adapters import add_dataclass_args, dataclass_from_args  # one flag generator for every script
    from model import ArgParser  # one line and exit 1 on bad flags, as in every script
    p = ArgParser(description=__doc__.split("\n\n")[0] + f" Recipes: {', '.join(RECIPES)}.")
    p.add_argument("recipe_name", metavar="recipe", nargs="?", help="the recipe (same as --recipe)")
    add_dataclass_args(p, DataConfig)
    ns = p.parse_args(argv)
    ns.recipe = ns.recipe_name or ns.recipe
    return dataclass_from_args(DataConfig, ns)


def main(argv=None):
    from model import one_line_errors
    cfg = parse_args(argv)
    with one_line_errors():
        if unknown := [r for r in cfg.recipe.split(",") if r not in RECIPES]:
            raise DataError(f"unknown recipe {unknown[0]!r}: choose one of {', '.join(RECIPES)}")
        if not cfg.out:
            raise DataError("--out DIR is required: where to write meta.json and the token files")
        if not cfg.model:
            raise DataError("--model DIR is required: the model whose tokenizer the data is for")
        if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
            raise DataError(f"--out {cfg.out} is a file, not a folder: choose a folder for the data")
        if (Path(cfg.out) / "config.json").is_file() or any(Path(cfg.out).glob("*.safetensors")):
            raise DataError(f"--out {cfg.out} holds a model checkpoint (config.json / safetensors): write the data "
                            f"to a folder of its own")
        prepare(cfg, load_tokenizer(cfg.model))


if __name__ == "__main__":
    main()
