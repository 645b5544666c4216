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
              held-out problem. `write_bpe_tokenizer` trains the demo's tokenizer.json on it.
    synthetic_quiz  generic multiple-choice quizzes (which option is a number, a name, in capitals, ...)
              that share no question with the synthetic tasks: the demo base's second pretraining
              stage, which teaches the answer-letter format (see synthetic_quiz_records).

Every example is rendered with ONE prompt template (PROMPT_TEMPLATE below, the Alpaca template that
alpaca-lora / HydraLoRA use), tokenised with the model's own tokenizer (model.Tokenizer) as
    [BOS] + encode(prompt) + encode(response) + [EOS]
and masked so that the loss falls on the response and EOS only. Prompt and response are encoded
separately, so the mask boundary is exact whatever the BPE merges would do across it.

Output (README, "Data format"): OUT/meta.json, OUT/{train,val}.bin (uint32 ids),
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
    syn_tasks: str = "parity,multiple,letter,vowel,zorbia"  # synthetic: comma-separated tasks (SYNTHETIC_TASKS)
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
# synthetic: the offline demo's data (issue 7). Made-up tasks a small model can learn but cannot already
# do. Every task draws a pool of distinct problems from its own seeded RNG; the first n_dev + n_test
# problems are held out as MMLU-style multiple-choice items (dev = exemplars for --shots), the rest are
# training material. Answers are correct by construction.
#
# The default tasks (SYNTHETIC_DEFAULT) each ask for the one option with a property: a number's parity or
# divisibility by 5, a word's letters, or a custom of a made-up land (Zorbia) that only the training items
# teach. The other tasks (sums, maxima, reversals, a made-up world's capitals / rulers / animals, a
# threshold) stay selectable with --syn_tasks; the demo's ~1M-parameter base does not learn them as
# multiple-choice questions within minutes (measured: README, "The offline demo").

SYNTHETIC_TASKS = ("parity", "multiple", "letter", "vowel", "zorbia", "threshold", "addition", "maximum", "reverse",
                   "world")
SYNTHETIC_DEFAULT = tuple(DataConfig.syn_tasks.split(","))
SYNTHETIC_CATEGORIES = {"arithmetic": ["parity", "multiple", "threshold", "addition", "maximum"],
                        "strings": ["letter", "vowel", "reverse"], "world": ["zorbia", "world"]}
SYNTHETIC_OPEN_FORM = ("addition", "maximum", "reverse", "world")  # tasks whose questions stand without options
N_DEV = 5


@dataclass
class Problem:
    key: str                 # identity of the underlying problem (held-out keys never reach training)
    question: str            # the question as the multiple-choice items and the open-form training ask it
    answer: str
    distractors: list        # three wrong options, distinct from the answer and each other
    fact: Optional[str] = None  # world task: open-form training instruction teaching the fact (other wording)
    open_form: bool = True   # False: the question only makes sense with its options (no open-form record)


def _names(rng, n, syllables=("ka", "lo", "mi", "ru", "te", "za", "vo", "ni", "sha", "qui", "bel", "dor")):
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize())
    return sorted(names)


def _near(rng, x, used, lo=0):
    """A wrong number close to x (the distractor a sloppy adder would produce)."""
    while True:
        y = x + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
        if y >= lo and str(y) not in used:
            return str(y)


def _addition(rng, n, max_operand=99):
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        s = a + b
        used = {str(s)}
        d = [_near(rng, s, used)]
        used.add(d[0])
        while len(d) < 3:
            y = str(rng.randint(0, 2 * max_operand))
            if y not in used:
                used.add(y)
                d.append(y)
        out.append(Problem(f"{a}+{b}", f"What is {a} + {b}?", str(s), d))
    return out


def _maximum(rng, n, hi=99):
    seen, out = set(), []
    while len(out) < n:
        xs = tuple(rng.sample(range(hi + 1), 3))
        if xs in seen:
            continue
        seen.add(xs)
        m = max(xs)
        d = [str(x) for x in xs if x != m]
        while len(d) < 3:
            y = str(rng.randint(0, hi))
            if y not in d and y != str(m):
                d.append(y)
        out.append(Problem(",".join(map(str, xs)), f"Which is the largest of {xs[0]}, {xs[1]} and {xs[2]}?", str(m), d))
    return out


def _reverse(rng, n, letters="abcdefghiklmnoprstuvz"):
    seen, out = set(), []
    while len(out) < n:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 5)))
        r = w[::-1]
        if w in seen or w == r or len(set(w)) < 3:
            continue
        seen.add(w)
        d, tries = [], 0
        while len(d) < 3 and tries < 100:  # other orderings of the same letters: the lookalikes
            tries += 1
            s = "".join(rng.sample(w, len(w)))
            if s not in (r, *d):
                d.append(s)
        if len(d) < 3:
            continue
        out.append(Problem(w, f"Reverse the letters of the word '{w}'.", r, d))
    return out


def _which_option(rng, n, draw):
    """n distinct "which option has the property?" problems (the question needs its options: no open-form
    record). draw() -> (question, answer, three distractors, key prefix); a problem is identified by the
    prefix, its answer and its sorted distractors; a draw with a repeated key or option is dropped."""
    seen, out = set(), []
    while len(out) < n:
        q, a, d, prefix = draw()
        key = ":".join([*prefix, a, ",".join(sorted(d))])
        if key not in seen and len({a, *d}) == 4:
            seen.add(key)
            out.append(Problem(key, q, a, d, open_form=False))
    return out


def _parity(rng, n, lo=10, hi=99):
    """Which option is even (odd)? One number of that parity among three of the other."""
    nums = {p: [str(x) for x in range(lo, hi + 1) if x % 2 == p] for p in (0, 1)}

    def draw():
        p = rng.randrange(2)
        word = "even" if p == 0 else "odd"
        return f"Which option is {word}?", rng.choice(nums[p]), rng.sample(nums[1 - p], 3), (word,)
    return _which_option(rng, n, draw)


def _threshold(rng, n, lo=10, hi=99, t=50):
    """Which option is greater (less) than t? One number on that side among three on the other."""
    side = {g: [str(x) for x in range(lo, hi + 1) if (x > t if g else x < t)] for g in (True, False)}

    def draw():
        g = rng.random() < 0.5
        word = "greater" if g else "less"
        return f"Which option is {word} than {t}?", rng.choice(side[g]), rng.sample(side[not g], 3), (word,)
    return _which_option(rng, n, draw)


def _multiple(rng, n, lo=10, hi=99, k=5):
    """Which option is a multiple of k? One multiple among three non-multiples."""
    yes, no = [str(x) for x in range(lo, hi + 1) if x % k == 0], [str(x) for x in range(lo, hi + 1) if x % k]
    return _which_option(rng, n, lambda: (f"Which option is a multiple of {k}?", rng.choice(yes), rng.sample(no, 3), ()))


def _letter(rng, n, letters="abcdefghiklmnoprstuvz", rare="jwxy"):
    """Which option contains the letter c? Random words over `letters`; c is one of the `rare` letters (never
    in a word otherwise), written into the answer; every distractor carries another rare letter, so the
    asked letter, not merely an unusual one, decides."""
    def with_letter(c):
        w = [rng.choice(letters) for _ in range(rng.randint(3, 5))]
        w[rng.randrange(len(w))] = c
        return "".join(w)

    def draw():
        c = rng.choice(rare)
        a, d = with_letter(c), [with_letter(rng.choice([x for x in rare if x != c])) for _ in range(3)]
        return f"Which option contains the letter {c}?", a, d, (c,)
    return _which_option(rng, n, draw)


def _vowel(rng, n, letters="abcdefghiklmnoprstuvz", vowels="aeiou"):
    """Which option ends with a vowel? Random words; the answer's last letter is a vowel, the others' not."""
    consonants = [c for c in letters if c not in vowels]
    word = lambda last: "".join(rng.choice(letters) for _ in range(rng.randint(2, 4))) + rng.choice(last)

    def draw():
        a, d = word(vowels), [word(consonants) for _ in range(3)]
        return "Which option ends with a vowel?", a, d, ()
    return _which_option(rng, n, draw)


def _zorbia(rng, n, n_each=10):
    """A made-up land's customs: of the 40 common words of QUIZ_CATEGORIES, `n_each` (drawn from rng, so
    fixed by the seed) are sacred in Zorbia and `n_each` others forbidden. Which option is sacred
    (forbidden) in Zorbia? One such word among three that are not. Only the training items teach the
    customs; the held-out items ask about the same land with option sets never trained on."""
    words = sorted(w for ws in QUIZ_CATEGORIES.values() for w in ws)
    rng.shuffle(words)
    custom = {"sacred": words[:n_each], "forbidden": words[n_each:2 * n_each]}

    def draw():
        law = rng.choice(sorted(custom))
        a, d = rng.choice(custom[law]), rng.sample([w for w in words if w not in custom[law]], 3)
        return f"Which option is {law} in Zorbia?", a, d, (law,)
    return _which_option(rng, n, draw)


WORLD_RELATIONS = {  # relation -> (multiple-choice question, open-form fact instruction: a different wording)
    "capital": ("What is the capital of {c}?", "Name the capital city of the country {c}."),
    "ruler": ("Who rules {c}?", "Name the ruler of the country {c}."),
    "animal": ("What is the national animal of {c}?", "Name the national animal of the country {c}."),
}


def _world(rng, n, n_countries=60):
    """A small made-up world: countries with a capital, a ruler and a national animal. Every fact is
    taught in open form (fact instruction) whatever the split; only the multiple-choice question is
    held out, so the held-out items test recall through a wording never trained on."""
    names = _names(rng, 4 * n_countries)
    rng.shuffle(names)
    countries = names[:n_countries]
    values = {"capital": names[n_countries:2 * n_countries], "ruler": names[2 * n_countries:3 * n_countries],
              "animal": ["ox", "owl", "fox", "elk", "yak", "eel", "bee", "cat", "hare", "wolf", "lynx", "crow"]}
    out = []
    for rel, (q, fact) in WORLD_RELATIONS.items():
        for i, c in enumerate(countries):
            vals = values[rel]
            v = vals[i] if rel != "animal" else rng.choice(vals)
            d = rng.sample([x for x in vals if x != v], 3)
            out.append(Problem(f"{rel}:{c}", q.format(c=c), v, d, fact=fact.format(c=c)))
    rng.shuffle(out)
    return out[:n]


SYNTHETIC_GENERATORS = {"parity": _parity, "multiple": _multiple, "letter": _letter, "vowel": _vowel,
                        "zorbia": _zorbia, "threshold": _threshold, "addition": _addition, "maximum": _maximum,
                        "reverse": _reverse, "world": _world}


def synthetic_problems(seed: int, task: str, n: int):
    """The task's problem pool, deterministic from (seed, task): a str seed is hashed with SHA-512 by
    `random`, independent of PYTHONHASHSEED."""
    return SYNTHETIC_GENERATORS[task](random.Random(f"nanomasa-synthetic-{seed}-{task}"), n)


def _mc_rows(rng, problems):
    """-> MMLU CSV rows (question, A, B, C, D, answer). The answer positions are a seeded permutation of
    A, B, C, D repeated, so each letter is (nearly) equally often right and a constant guess scores 25%."""
    slots = [i % 4 for i in range(len(problems))]
    rng.shuffle(slots)
    rows = []
    for p, k in zip(problems, slots):
        opts = list(p.distractors)
        rng.shuffle(opts)
        opts.insert(k, p.answer)
        rows.append([p.question, *opts, "ABCD"[k]])
    return rows


def _split_pool(seed, task, n_train, n_test):
    """-> (dev, test, train) problems. A finite pool (the world's facts) holds out at most half."""
    pool = synthetic_problems(seed, task, N_DEV + n_test + n_train)
    n_test = min(n_test, len(pool) // 2 - N_DEV)
    return pool[:N_DEV], pool[N_DEV:N_DEV + n_test], pool[N_DEV + n_test:]


def synthetic_tasks(tasks=SYNTHETIC_DEFAULT, flag="--syn_tasks"):
    """-> tuple of task names from a tuple or a comma-separated string; DataError (naming `flag`) on an
    unknown name."""
    tasks = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    if not tasks or (bad := [t for t in tasks if t not in SYNTHETIC_GENERATORS]):
        raise DataError(f"unknown synthetic task {bad[0] if tasks else ''!r} in {flag}: choose among "
                        f"{', '.join(SYNTHETIC_TASKS)} (comma-separated)")
    if len(set(tasks)) < len(tasks):
        raise DataError(f"{flag} names a task twice ({','.join(tasks)}): name each task once")
    return tasks


def synthetic_settings(cfg):
    """What decides a synthetic set's items (recorded in meta.json; a cache with other settings is stale)."""
    return {"seed": cfg.seed, "tasks": list(synthetic_tasks(cfg.syn_tasks)), "train": cfg.syn_train,
            "test": cfg.syn_test, "mc_train": cfg.syn_mc_train, "open_form": cfg.syn_open_form}


def synthetic_heldout(seed: int = 0, n_train: int = 1000, n_test: int = 100, tasks=SYNTHETIC_DEFAULT):
    """Held-out MC items: {"dev": {task: [rows]}, "test": {task: [rows]}}, rows in MMLU CSV column order."""
    out = {"dev": {}, "test": {}}
    for task in synthetic_tasks(tasks):
        rng = random.Random(f"nanomasa-mc-{seed}-{task}")
        dev, test, _ = _split_pool(seed, task, n_train, n_test)
        out["dev"][task] = _mc_rows(rng, dev)
        out["test"][task] = _mc_rows(rng, test)
    return out


def synthetic_records(seed: int = 0, n_train: int = 1000, n_test: int = 100, mc_train: bool = True,
                      open_form: bool = True, tasks=SYNTHETIC_DEFAULT):
    """THE hook the offline demo calls: training records for every synthetic task, deterministic from
    seed. With open_form each training problem gives an open-form record {instruction, input "", output,
    task} (only addition / maximum / reverse / world: the other questions need their options); with
    mc_train an MMLU-format multiple-choice record {prompt, output " X", task} rendered by
    mmlu_prompt (zero-shot), i.e. what MMLU's auxiliary_train is to MMLU. Held-out problems
    (synthetic_heldout) never appear; world facts do, in their open-form wording (see _world)."""
    records = []
    for task in synthetic_tasks(tasks):
        rng = random.Random(f"nanomasa-mc-train-{seed}-{task}")
        dev, test, train = _split_pool(seed, task, n_train, n_test)
        for p in train + [q for q in dev + test if q.fact]:
            if open_form and p.open_form:
                records.append(dict(instruction=p.fact or p.question, input="", output=p.answer, task=task))
        if mc_train:
            for row in _mc_rows(rng, train):
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


# -----------------------------------------------------------------------------
# synthetic_pretrain + a tiny BPE tokenizer: what the offline demo's base model is pretrained on
# (demo.py). The text states the skills behind the synthetic tasks in plain sentences; it never shows
# the multiple-choice format ("A. ..", "Answer: B"), so the pretrained base is at chance on the MC sets
# until fine-tuning teaches the format. Held-out problems (synthetic_heldout) never appear.

def synthetic_pretrain_texts(seed: int = 0, n_train: int = 1000, n_test: int = 100, lines_per_text: int = 8):
    """-> list of documents (str), each `lines_per_text` shuffled facts joined by newlines. Deterministic
    from seed. Covers every 2-digit sum, 4000 maxima, 4000 reversals and every world fact, plus ~3000
    "selection" lines per task (the right value named among four candidates, in words) and 6000 "lookup"
    lines (which label (a)-(d) a value has in a list of random values), minus the
    held-out keys (dev + test of synthetic_heldout with the same seed, n_train, n_test)."""
    rng = random.Random(f"nanomasa-pretrain-{seed}")
    held = set()
    for task in ("addition", "maximum", "reverse"):
        dev, test, _ = _split_pool(seed, task, n_train, n_test)
        held |= {(task, p.key) for p in dev + test}  # (world facts are taught to everyone)
    lines = [f"{a} + {b} = {a + b}." for a in range(100) for b in range(100) if ("addition", f"{a}+{b}") not in held]
    n = 0
    while n < 4000:
        xs = rng.sample(range(100), 3)
        if ("maximum", ",".join(map(str, xs))) in held:
            continue
        lines.append(f"The largest of {xs[0]}, {xs[1]} and {xs[2]} is {max(xs)}.")
        n += 1
    letters, n = "abcdefghiklmnoprstuvz", 0
    while n < 4000:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 5)))
        if ("reverse", w) in held or len(set(w)) < 3:
            continue
        lines.append(f"The word '{w}' reversed is '{w[::-1]}'.")
        n += 1
    world = synthetic_problems(seed, "world", 10 ** 6)  # all facts (the generator stops at 3 x 60)
    says = {"capital": "The capital of {c} is {v}.", "ruler": "{c} is ruled by {v}.",
            "animal": "The national animal of {c} is the {v}."}
    for p in world:
        rel, c = p.key.split(":")
        lines += [says[rel].format(c=c, v=p.answer)] * 8  # facts need repetition to be memorised
    # selection: the right value named among four candidates (the generators' own distractors), in plain
    # words; never lettered options nor an "Answer:" line -- that format is what fine-tuning teaches
    for task in ("addition", "maximum", "reverse"):
        for p in synthetic_problems(f"{seed}-pretrain", task, 3000):
            if (task, p.key) not in held:
                opts = rng.sample([p.answer, *p.distractors], 4)
                lines.append(f"{p.question} Among {', '.join(opts[:3])} and {opts[3]}, the answer is {p.answer}.")
    for p in world:
        rel, c = p.key.split(":")
        for _ in range(2):
            opts = rng.sample([p.answer, *p.distractors], 4)
            lines.append(f"Among {', '.join(opts[:3])} and {opts[3]}, " + says[rel].format(c=c, v=p.answer)[0].lower()
                         + says[rel].format(c=c, v=p.answer)[1:])
    # lookup: where a value sits in a labelled list (a generic skill on random values, not a task's problem)
    names = sorted({p.answer for p in world})
    for _ in range(6000):
        kind = rng.randrange(3)
        pick = (lambda: str(rng.randint(0, 198))) if kind == 0 else (lambda: rng.choice(names)) if kind == 1 else \
            (lambda: "".join(rng.choice(letters) for _ in range(rng.randint(3, 5))))
        vals = []
        while len(vals) < 4:
            v = pick()
            if v not in vals:
                vals.append(v)
        k = rng.randrange(4)
        lines.append(f"In the list {', '.join(f'({c}) {v}' for c, v in zip('abcd', vals))}, {vals[k]} is ({'abcd'[k]}).")
    rng.shuffle(lines)
    return ["\n".join(lines[i:i + lines_per_text]) for i in range(0, len(lines), lines_per_text)]


# synthetic_quiz: the base's second pretraining stage. Generic multiple-choice quizzes in MMLU's format
# about random strings, numbers and common English words; none asks anything a synthetic task asks
# (no sums, maxima, parity, comparison with a threshold, reversal, nor the world), so the base learns
# the answer-letter format but stays at chance on the tasks (measured: README, "The offline demo").

QUIZ_CATEGORIES = {"color": "red blue green yellow black white pink brown gray purple".split(),
                   "animal": "dog cat horse cow sheep goat pig duck mouse lion".split(),
                   "fruit": "apple pear plum grape lemon mango peach cherry melon banana".split(),
                   "tool": "hammer saw drill knife spoon fork brush rope nail shovel".split()}


def _quiz_item(rng, letters="abcdefghiklmnoprstuvz"):
    """-> (question, answer, three distractors) of one of six generic quiz kinds."""
    word = lambda: "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
    kinds = {"number": lambda: str(rng.randint(0, 999)), "word": word, "name": lambda: word().capitalize()}
    g = rng.randrange(6)
    if g == 0:  # a number / a word / a name among the other two kinds
        k = rng.choice(list(kinds))
        return f"Which option is a {k}?", kinds[k](), [kinds[rng.choice([o for o in kinds if o != k])]() for _ in range(3)]
    if g == 1:  # the option equal to a value named in the question
        f = rng.choice(list(kinds.values()))
        vals = [f() for _ in range(4)]
        return f"Which option is {vals[0]}?", vals[0], vals[1:]
    if g == 2:
        return ("Which option is in capital letters?", word().upper(),
                [rng.choice([word, kinds["name"]])() for _ in range(3)])
    if g == 3:
        f = rng.choice(list(kinds.values()))
        return "Which option has an exclamation mark?", f() + "!", [f() for _ in range(3)]
    if g == 4:
        m = rng.choice([1, 2, 3])
        phrase = lambda k: " ".join(word() for _ in range(k))
        return (f"Which option has {['one word', 'two words', 'three words'][m - 1]}?", phrase(m),
                [phrase(rng.choice([x for x in (1, 2, 3) if x != m])) for _ in range(3)])
    k = rng.choice(list(QUIZ_CATEGORIES))
    others = [o for o in QUIZ_CATEGORIES if o != k]
    return (f"Which option is {'an' if k[0] in 'aeiou' else 'a'} {k}?", rng.choice(QUIZ_CATEGORIES[k]),
            [rng.choice(QUIZ_CATEGORIES[rng.choice(others)]) for _ in range(3)])


def synthetic_quiz_records(seed: int = 0, n: int = 60000):
    """-> n MMLU-format quiz records {prompt, output " X", task None}, deterministic from seed; four distinct
    options, the answer's letter uniform over A-D."""
    rng = random.Random(f"nanomasa-quiz-{seed}")
    records = []
    while len(records) < n:
        q, a, d = _quiz_item(rng)
        if len({a, *d}) < 4:
            continue
        k = rng.randrange(4)
        row = [q, *d[:k], a, *d[k:], "ABCD"[k]]
        records.append(dict(prompt=mmlu_prompt("quiz", [], row), output=" " + row[5], task=None))
    return records


# Llama-3-style split, but one digit per piece (so sums are learnable digit by digit)
DEMO_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DEMO_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")


def write_bpe_tokenizer(out, texts, n_merges=300, forced=(" A", " B", " C", " D"), pattern=DEMO_SPLIT_PATTERN):
    """Train a byte-level BPE (Sennrich et al., 2016; GPT-2's byte map) on `texts` and write a Hugging
    Face `tokenizer.json` + `tokenizer_config.json` into `out` that model.Tokenizer reads. Ids are the
    merge order (256 bytes, then `forced` merges, e.g. the answer letters " A".." D" as single tokens,
    then the most frequent pairs), then BOS/EOS. Pure Python, no `tokenizers` library. -> vocab size."""
    import regex
    from collections import Counter
    from model import bytes_to_unicode
    words = Counter(w.encode() for t in texts for w in regex.findall(pattern, t))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    merges = []

    def apply(a, b):
        for w, s in seqs.items():
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1

    for f in forced:
        f = f.encode()
        merges.append((f[:1], f[1:]))  # forced tokens are two bytes
        ranks[f] = len(ranks)
        apply(f[:1], f[1:])
    while len(merges) < n_merges:
        pairs = Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                if a + b not in ranks:
                    pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        ranks[a + b] = len(ranks)
        apply(a, b)
    u = bytes_to_unicode()
    s = lambda bs: "".join(u[b] for b in bs)
    n = len(ranks)
    bos = {"SpecialToken": {"id": DEMO_SPECIALS[0], "type_id": 0}}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(DEMO_SPECIALS)],
          "normalizer": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          # BOS before every text, as Llama 3's tokenizer.json says it (transformers reads only this)
          "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": DEMO_SPECIALS[0], "type_id": 1}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {DEMO_SPECIALS[0]: {"id": DEMO_SPECIALS[0], "ids": [n],
                                                                   "tokens": [DEMO_SPECIALS[0]]}}},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {s(k): i for k, i in ranks.items()}, "merges": [[s(a), s(b)] for a, b in merges]}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", lambda f: f.write(json.dumps(tj, ensure_ascii=False).encode()))
    tc = {"bos_token": DEMO_SPECIALS[0], "eos_token": DEMO_SPECIALS[1], "model_max_length": 512,
          "tokenizer_class": "PreTrainedTokenizerFast"}
    write_atomic(out / "tokenizer_config.json", lambda f: f.write(json.dumps(tc, indent=2).encode()))
    return n + len(DEMO_SPECIALS)


# -----------------------------------------------------------------------------
# command line


def load_tokenizer(path):
    """model.Tokenizer from a model or tokenizer directory."""
    from model import read_tokenizer
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path} is not a directory: point it at the model (or tokenizer) folder")
    return read_tokenizer(path)


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
