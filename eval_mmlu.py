"""
eval_mmlu.py -- MMLU by the original protocol (Hendrycks et al., ICLR 2021), plus GSM8K and BBH.

MMLU (the default task) follows hendrycks/test `evaluate.py` / `evaluate_flan.py` (see docs/evaluation.md and
shared MMLU_PROTOCOL.md):
  * subjects = sorted `<subject>_test.csv` names; exemplars = the FIRST k rows of `<subject>_dev.csv`,
    in file order, for every question of that subject (k = --shots, default 0: the MASA paper's
    zero-shot setting; --shots 5 is the usual reported setting);
  * prompt = "The following are multiple choice questions (with answers) about" + " " + " abstract
    algebra" + ".\\n\\n" (so TWO spaces before the subject, as in the reference), then per example
    "question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" (+ " X\\n\\n" for exemplars); nothing stripped;
  * if BOS + prompt exceeds --max_len tokens (default 2048, the reference's limit, capped at the
    model's window, less a soft prompt's virtual tokens), k drops by one until it fits; the question
    itself is never cut;
  * the answer is the argmax over the next-token logits of the four letter tokens after "Answer:",
    in the form the tokenizer gives them inside "Answer: B" (checked at start, e.g. " B"); a tiny
    vocabulary that splits a letter (" " + "B") gets lm-eval's summed continuation log-probabilities;
  * accuracy pooled over questions (micro) per subject, subcategory, category (categories.json next
    to the data: anatomy counts as "other", as in hendrycks/test; lm-eval puts it under STEM) and
    overall; the macro mean over subjects is reported too.
  * CSVs are read with Python's csv module, so an option whose text is "None" stays "None" (pandas'
    default turns it into NaN, which the reference then prints as "nan": 10 test options differ).

--task gsm8k: greedy generation from format_prompt(question) (prepare_data's template), the final
number taken after "####" (else the last number) and compared with the `#### N` answer.
--task bbh: zero-shot BIG-Bench Hard, greedy generation, exact match after normalisation, accuracy
per task file and their unweighted mean.

A task-gated adapter (MoELoRA, MTL-LoRA) needs the task id of every prompt: each MMLU subject (BBH task
file; GSM8K: "gsm8k") is mapped to the id of the task of the same name saved with the adapter
(adapter.json "tasks", the training data's task names), or --task_id N evaluates everything as task N.
A subject with no task of its name is refused.

Run:
    python eval_mmlu.py --model DIR [--adapter DIR] --data data/mmlu --shots 5 --out results.json
    python eval_mmlu.py --task gsm8k --model DIR --data gsm8k/test.jsonl
    python eval_mmlu.py --task bbh --model DIR --data bbh/
"""
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from model import ArgParser, check_device, one_line_errors, read_json, write_atomic
# the prompts live in prepare_data.py (the demo's quiz records use the MMLU prompt too); imported here so
# eval_mmlu.mmlu_prompt / eval_mmlu.format_prompt still name them
from prepare_data import LETTERS, format_prompt, mmlu_prompt

# -----------------------------------------------------------------------------
# config


@dataclass
class EvalConfig:
    task: str = "mmlu"              # mmlu | gsm8k | bbh
    model: str = ""                 # base or merged checkpoint directory (HF format)
    adapter: Optional[str] = None   # adapter directory saved by adapters.save_adapter, loaded on the base
    tokenizer: Optional[str] = None  # tokenizer directory if not the model's
    data: str = ""                  # mmlu: folder of MMLU-style CSVs; gsm8k: test.jsonl; bbh: folder of task JSONs
    split: str = "test"             # mmlu: which split's CSVs to score (dev rows are always the exemplars)
    shots: int = 0                  # mmlu: k exemplars from dev (the reference's default is 5)
    max_len: int = 2048             # mmlu: context-length rule limit in tokens (BOS included)
    batch_size: int = 8             # prompts per forward pass (left padded)
    subjects: Optional[str] = None  # comma list of subjects / BBH tasks to run (default all)
    limit: int = 0                  # first N items per subject / task (0 = all), for quick runs
    max_new_tokens: int = 0         # generation budget (0: 256 for gsm8k, 64 for bbh)
    prompt: str = "template"        # gsm8k / bbh: "template" (format_prompt) or "plain" ("Q: ...\nA:")
    dtype: str = "auto"             # auto (bf16 on CUDA if supported, else fp32) | fp32 | bf16 | fp16
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    task_id: Optional[int] = None   # task-gated adapters (moelora, mtllora): evaluate everything as this task id (default: by subject name)
    out: Optional[str] = None       # write results.json (every prediction included) here


class EvalError(ValueError):
    """Bad input: one line naming the problem and the fix."""


# -----------------------------------------------------------------------------
# data: MMLU-style CSVs (no header: question, A, B, C, D, answer letter)


def read_csv(path):
    """Rows of an MMLU-style CSV as lists of 6 strings. A real CSV reader: quoted newlines, CRLF and a
    UTF-8 BOM are handled, and text such as "None" or "NA" is kept verbatim (never turned into NaN)."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in utf8_lines(reader, path):
            if not row:
                continue
            if len(row) != 6:
                raise EvalError(f"{path}, record ending on line {reader.line_num}: {len(row)} fields, expected 6 "
                                f"(question, A, B, C, D, answer letter)")
            if row[5].strip() not in LETTERS:
                raise EvalError(f"{path}, record ending on line {reader.line_num}: answer {row[5]!r} "
                                f"is not one of A B C D")
            rows.append(row[:5] + [row[5].strip()])
    return rows


def utf8_lines(lines, path):
    """Iterate `lines` (read from a UTF-8 text file); a byte sequence that is not UTF-8 ends in one line naming
    the file and the byte (a CSV saved as Latin-1 or UTF-16, say)."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 ({e.reason} at byte {e.start} of a block): re-save it as UTF-8") from None


def subject_files(data_dir, split):
    """{subject: csv path} for one split: DIR/<split>/<subject>_<split>.csv, else DIR/<subject>_<split>.csv,
    else (test split only) every DIR/<subject>.csv."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--data {d} is not a directory of MMLU-style CSVs")
    suffix = f"_{split}.csv"
    for folder in (d / split, d):
        files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
        if files:
            return {p.name[:-len(suffix)]: p for p in files}
    if split == "test":
        files = [p for p in sorted(d.glob("*.csv")) if not re.search(r"_(dev|val)\.csv$", p.name)]
        if files:
            return {p.stem: p for p in files}
    raise FileNotFoundError(f"no {split} CSVs in {d}: expected {d}/{split}/<subject>{suffix} or {d}/<subject>{suffix}")


def load_categories(data_dir):
    """categories.json next to the data (hendrycks/test categories.py as JSON), or None."""
    p = Path(data_dir) / "categories.json"
    if not p.is_file():
        return None
    cats = read_json(p, fix="fix it (hendrycks/test categories as JSON), or delete it")
    if not isinstance(cats.get("categories"), dict) or not isinstance(cats.get("subcategories"), dict):
        raise EvalError(f"{p}: needs 'categories' and 'subcategories' objects: fix it, or delete it")
    return cats


# -----------------------------------------------------------------------------
# scoring


def encode_prompt(tok, text):
    """Tokens framed as the checkpoint's own tokenizer frames a text (transformers' add_special_tokens=True:
    [BOS] + tokens for Llama, no BOS for Qwen2 / SmolLM2; tokenizer.py reads the post-processor)."""
    return tok.encode(text, bos=True)


def length_batches(lengths, batch_size, max_tokens):
    """Indices grouped into batches, longest first: a batch closes when it holds batch_size prompts, when
    padding to its longest would exceed max_tokens, or when the next prompt is under half its longest
    (so one long outlier never pads seven short prompts to its length)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batches = []
    for j in order:
        b = batches[-1] if batches else None
        if b and len(b) < batch_size and (len(b) + 1) * lengths[b[0]] <= max_tokens and 2 * lengths[j] >= lengths[b[0]]:
            b.append(j)
        else:
            batches.append([j])
    return batches


def letter_continuations(tok):
    """-> (path, conts): the tokens each answer letter adds after "Answer:" in an exemplar ("Answer: B").
    GPT-2 / Llama-3 / Qwen2 BPE and SentencePiece give one token per letter (" B"): conts = [[id_A], ..],
    path = [], and scoring is the reference's next-token comparison. A small vocabulary may split a
    letter (" " + "B"); then a letter scores the summed log-probability of its tokens, as
    lm-evaluation-harness does, and `path` is the token sequence (shared by the split letters) that
    is appended to the prompt so one forward pass yields every position needed."""
    base = tok.encode("Answer:")
    conts = []
    for L in LETTERS:
        full = tok.encode(f"Answer: {L}")
        if full[:len(base)] != base or len(full) == len(base):
            raise EvalError(f"the tokenizer merges 'Answer:' with the letter ({full}): cannot score answer letters")
        conts.append(full[len(base):])
    path = max((c[:-1] for c in conts), key=len)
    if any(c[:-1] != path[:len(c) - 1] for c in conts) or len({tuple(c) for c in conts}) != 4:
        raise EvalError(f"answer letters after 'Answer:' tokenise as {conts}: they must differ in their last "
                        f"token only and share the tokens before it")
    return path, conts


def fit_shots(tok, subject, dev_rows, row, k, max_len):
    """The reference's context-length rule: lower k until BOS + prompt fits in max_len tokens."""
    while True:
        ids = encode_prompt(tok, mmlu_prompt(subject, dev_rows[:k], row))
        if len(ids) <= max_len or k == 0:
            return ids, k
        k -= 1


@torch.no_grad()
def tail_logits(model, seqs, n=1, pad_id=0):
    """Logits at the last n positions of each sequence: list of B id lists -> (B, n, V) fp32. Left
    padding, so the tail is real tokens in every row; the model shifts RoPE positions past the padding."""
    T = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = torch.tensor(s)
        am[i, T - len(s):] = 1
    ragged = any(len(s) != T for s in seqs)
    # Only the last n positions need lm_head: (B, n, V) logits instead of (B, T, V), which for Llama 3
    # (V = 128,256) is most of the memory.
    logits = model(idx.to(device), attention_mask=am.to(device) if ragged else None, logits_to_keep=n)
    return logits.float().cpu()  # (B, n, V)


def check_finite(logits, where):
    """NaN logits would score every question "A" and still report an accuracy: refuse them."""
    if not torch.isfinite(logits).all():
        raise EvalError(f"the model's logits are NaN or infinite ({where}): check the base (NaN weights; config.json "
                        f"rope_theta, rms_norm_eps) and the adapter; try --dtype fp32 if fp16 overflows")


def letter_scores(logits, conts):
    """logits (B, P+1, V) at the prompt's last token and the P path tokens -> (B, 4) letter scores:
    the raw next-token logits when every letter is one token (P = 0; the reference's comparison),
    else each letter's summed log-probability over its tokens."""
    if logits.size(1) == 1:
        return logits[:, 0, [c[0] for c in conts]]
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([sum(logp[:, t, tok_id] for t, tok_id in enumerate(c)) for c in conts], dim=1)


def task_map(model, names, task_id=None):
    """{name: task id} of each subject / task name for a model with a task-gated adapter (MoELoRA, MTL-LoRA):
    the position of the name in the adapter's task names (saved from the training data's meta.json), or
    task_id for every name when given. None for any other model. A name with no task is refused."""
    acfg = getattr(model, "adapter_config", None)
    if acfg is None or not any(getattr(m, "task_gated", False) for m in model.modules()):
        if task_id is not None:
            raise EvalError(f"--task_id {task_id}: the model has no task-gated adapter (moelora, mtllora)")
        return None
    if task_id is not None:
        if not 0 <= task_id < acfg.num_tasks:
            raise EvalError(f"--task_id {task_id} is not a task of the adapter: choose 0..{acfg.num_tasks - 1}")
        return {n: task_id for n in names}
    known = getattr(model, "adapter_tasks", None) or []
    if missing := [n for n in names if n not in known]:
        raise EvalError(f"{len(missing)} subject(s)/task(s) ({', '.join(missing[:3])}) have no task in the {acfg.adapter} "
                        f"adapter (its tasks: {', '.join(known) or 'unnamed'}): pass --task_id N to evaluate them as "
                        f"task N, or leave them out with --subjects")
    return {n: known.index(n) for n in names}


def set_tasks(model, ids):
    """Hand the task ids (one per prompt of the next forward, or one for all) to the task-gated adapter."""
    import adapters
    adapters.set_task(model, ids)


def evaluate_mmlu(model, tok, data_dir, shots=0, split="test", max_len=2048, batch_size=8,
                  subjects=None, limit=0, progress=True, task_id=None):
    """Python API: score every question of `split` in data_dir; returns the results dict (see aggregate).
    task_id: see task_map (task-gated adapters only)."""
    files = subject_files(data_dir, split)
    if subjects:
        missing = [s for s in subjects if s not in files]
        if missing:
            raise EvalError(f"subject(s) {', '.join(missing)} not in {data_dir} ({split} split)")
        files = {s: files[s] for s in subjects}
    tasks = task_map(model, list(files), task_id)  # {subject: task id}, None unless task-gated
    categories = load_categories(data_dir)  # read before scoring, so a bad file fails fast
    try:
        dev = subject_files(data_dir, "dev") if shots > 0 else {}
    except FileNotFoundError:
        dev = {}
    if shots > 0 and (missing := [s for s in files if s not in dev]):
        raise EvalError(f"--shots {shots} needs dev CSVs (exemplars): none for {', '.join(missing[:3])} in "
                        f"{data_dir}; add <subject>_dev.csv files or use --shots 0")
    n_virtual = getattr(getattr(model, "soft_prompt", None), "P", 0)  # a soft prompt's P positions come first
    max_len = min(max_len, getattr(getattr(model, "config", None), "max_position_embeddings", max_len) - n_virtual)
    tail, conts = letter_continuations(tok)  # tail: tokens shared by split letters

    items = []  # (subject, index, row, ids, k_used)
    for s, path in files.items():
        dev_rows = read_csv(dev[s]) if shots > 0 else []
        if len(dev_rows) < shots:  # fewer exemplars than asked would pass for a context-length cut
            raise EvalError(f"{dev[s]}: {len(dev_rows)} exemplar rows, --shots {shots} needs {shots}: add dev rows or "
                            f"lower --shots")
        rows = read_csv(path)[:limit or None]
        if not rows:  # a subject with no question would vanish from the results without a word
            raise EvalError(f"{path}: no questions: fill it, or leave {s} out (--subjects, or remove the file)")
        for i, row in enumerate(rows):
            ids, k = fit_shots(tok, s, dev_rows, row, min(shots, len(dev_rows)), max_len - len(tail))
            items.append((s, i, row, ids, k))
    if not items:
        raise EvalError(f"no questions in {data_dir} ({split} split)")

    # longest first, so each batch pads little and the first batch shows the peak memory
    scores = [None] * len(items)
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0
    with tqdm(total=len(items), desc=f"mmlu {shots}-shot", unit="q", disable=not progress) as bar:
        lengths = [len(it[3]) + len(tail) for it in items]
        for chunk in length_batches(lengths, batch_size, batch_size * max(512, max_len // 2)):
            if tasks:  # a batch may mix subjects: one task id per prompt
                set_tasks(model, [tasks[items[j][0]] for j in chunk])
            logits = tail_logits(model, [items[j][3] + tail for j in chunk], len(tail) + 1, pad)  # (B, P+1, V)
            check_finite(logits, items[chunk[0]][0])
            for j, row_logits in zip(chunk, letter_scores(logits, conts).tolist()):                # (B, 4)
                scores[j] = row_logits
            bar.update(len(chunk))

    preds = []
    for (s, i, row, ids, k), sc in zip(items, scores):
        p = LETTERS[max(range(4), key=lambda c: (sc[c], -c))]  # argmax, first on ties (np.argmax)
        preds.append({"subject": s, "index": i, "answer": row[5], "pred": p, "correct": p == row[5],
                      "shots": k, "tokens": len(ids), "scores": sc})
    res = aggregate(preds, categories)
    res.update({"task": "mmlu", "split": split, "shots": shots, "max_len": max_len,
                "reduced_shots": sum(p["shots"] < shots for p in preds),
                "letter_tokens": {L: [c, tok.decode(c)] for L, c in zip(LETTERS, conts)},
                "scores": "next-token logits" if not tail else "continuation log-probabilities",
                "predictions": preds})
    if tasks:
        res["task_ids"] = tasks  # the adapter task each subject was scored as
    return res


def aggregate(preds, categories=None):
    """Micro accuracy (pooled questions) per subject, subcategory, category and overall, as
    hendrycks/test does; plus the macro mean over subjects."""
    def acc(ps):
        return {"acc": sum(p["correct"] for p in ps) / len(ps), "n": len(ps)}
    by_subject = {}
    for p in preds:
        by_subject.setdefault(p["subject"], []).append(p)
    out = {"accuracy": acc(preds)["acc"], "n": len(preds),
           "macro": sum(acc(ps)["acc"] for ps in by_subject.values()) / len(by_subject),
           "subjects": {s: acc(ps) for s, ps in sorted(by_subject.items())}, "subcategories": {}, "categories": {}}
    if categories:
        sub_to_cat = {sub: c for c, subs in categories["categories"].items() for sub in subs}
        groups_sub, groups_cat = {}, {}
        for s, ps in by_subject.items():
            subs = categories["subcategories"].get(s, ["(not in categories.json)"])
            for sub in subs:
                groups_sub.setdefault(sub, []).extend(ps)
                groups_cat.setdefault(sub_to_cat.get(sub, "(not in categories.json)"), []).extend(ps)
        out["subcategories"] = {k: acc(v) for k, v in sorted(groups_sub.items())}
        out["categories"] = {k: acc(v) for k, v in sorted(groups_cat.items())}
    return out


# -----------------------------------------------------------------------------
# generation tasks: GSM8K and BBH


@torch.no_grad()
def generate_texts(model, tok, prompts, max_new_tokens, batch_size=8, desc="generate", progress=True):
    """Greedy completion of each prompt, batched with left padding (longest first), each cut at its
    first stop token."""
    device = next(model.parameters()).device
    stop = set(getattr(tok, "stop_ids", None) or ([tok.eos_id] if tok.eos_id is not None else []))
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0
    seqs = [encode_prompt(tok, p) for p in prompts]
    out = [None] * len(seqs)
    with tqdm(total=len(seqs), desc=desc, unit="q", disable=not progress) as bar:
        for chunk in length_batches([len(s) for s in seqs], batch_size, batch_size * 1024):
            T = len(seqs[chunk[0]])
            idx = torch.full((len(chunk), T), pad, dtype=torch.long)
            am = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, j in enumerate(chunk):
                idx[i, T - len(seqs[j]):] = torch.tensor(seqs[j])
                am[i, T - len(seqs[j]):] = 1
            ragged = bool((am == 0).any())
            y = model.generate(idx.to(device), max_new_tokens, temperature=0.0, stop_ids=stop,
                               attention_mask=am.to(device) if ragged else None)
            for i, j in enumerate(chunk):
                new = y[i, T:].tolist()
                cut = next((t for t, v in enumerate(new) if v in stop), len(new))
                out[j] = tok.decode(new[:cut])
            bar.update(len(chunk))
    return out


def _prompt(question, style):
    if style == "template":
        return format_prompt(question, "")
    if style == "plain":
        return f"Q: {question}\nA:"
    raise EvalError(f"--prompt {style!r}: choose template or plain")


def normalize_number(s):
    """'1,234' -> '1234', '$18.00' -> '18', '0.50' -> '0.5'; non-numbers come back stripped."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s
    if not math.isfinite(x):
        return s
    return str(int(x)) if x == int(x) else repr(x)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_gsm8k_answer(text):
    """The number after the first "####" (GSM8K's answer line), else the last number in the text; None if
    there is none. Normalised with normalize_number."""
    if "####" in text:
        m = _NUMBER.search(text.split("####", 1)[1])
        if m:
            return normalize_number(m.group())
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def read_jsonl(path, keys):
    """Records of a JSON Lines file, each an object with string fields `keys`; one line naming the file and line
    for anything else."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(utf8_lines(f, path)):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise EvalError(f"{path}, line {i + 1}: not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in keys):
                raise EvalError(f"{path}, line {i + 1}: needs an object with string fields {', '.join(keys)}: fix "
                                f"or remove that line")
            rows.append(r)
    return rows


def evaluate_gsm8k(model, tok, path, limit=0, max_new_tokens=256, prompt="template", batch_size=8, progress=True,
                   task_id=None):
    """Python API: greedy GSM8K accuracy on a JSONL of {question, answer ending in '#### N'}."""
    p = Path(path)
    p = p / "test.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--data {path}: expected GSM8K test.jsonl (or a folder holding it)")
    if tasks := task_map(model, ["gsm8k"], task_id):
        set_tasks(model, tasks["gsm8k"])
    rows = read_jsonl(p, ("question", "answer"))[:limit or None]
    if not rows:
        raise EvalError(f"{p}: no problems: fill it with GSM8K's test.jsonl")
    gens = generate_texts(model, tok, [_prompt(r["question"], prompt) for r in rows], max_new_tokens, batch_size,
                          "gsm8k", progress)
    preds = []
    for i, (r, g) in enumerate(zip(rows, gens)):
        target, pred = extract_gsm8k_answer(r["answer"]), extract_gsm8k_answer(g)
        preds.append({"index": i, "target": target, "pred": pred, "correct": pred == target, "generation": g})
    return {"task": "gsm8k", "n": len(preds), "accuracy": sum(q["correct"] for q in preds) / len(preds),
            "prompt": prompt, "predictions": preds}


_MC_TARGET = re.compile(r"\([a-z]\)")


def normalize_bbh(s):
    """Lower-cased, whitespace-collapsed answer: the text after "So the answer is" if present, its first
    line, without surrounding quotes/spaces and a final period."""
    m = re.search(r"the answer is\s*:?\s*(.*)", s, re.IGNORECASE | re.DOTALL)
    s = (m.group(1) if m else s).strip()
    s = s.split("\n", 1)[0].strip().rstrip(".").strip().strip("\"'").strip()
    return " ".join(s.lower().split())


def bbh_match(pred, target):
    """Exact match after normalize_bbh. For an option label target "(B)", a prediction "(B)", "B",
    "(B) the text" or "B." counts as B."""
    p, t = normalize_bbh(pred), normalize_bbh(target)
    if _MC_TARGET.fullmatch(t):
        m = re.match(r"\(?([a-z])\)?(?=$|[\s.,:;)])", p)
        p = f"({m.group(1)})" if m else p
    return p == t


def evaluate_bbh(model, tok, data_dir, tasks=None, limit=0, max_new_tokens=64, prompt="template", batch_size=8,
                 progress=True, task_id=None):
    """Python API: zero-shot BBH accuracy per task file and their unweighted mean."""
    d = Path(data_dir)
    files = {p.stem: p for p in sorted(d.glob("*.json"))} if d.is_dir() else {}
    if not files:
        raise FileNotFoundError(f"--data {data_dir}: expected a folder of BBH task files (<task>.json)")
    if tasks:
        if missing := [t for t in tasks if t not in files]:
            raise EvalError(f"BBH task(s) {', '.join(missing)} not in {data_dir}")
        files = {t: files[t] for t in tasks}
    ids = task_map(model, list(files), task_id)  # {task file: adapter task id}, None unless task-gated
    preds, per_task = [], {}
    for t, path in files.items():
        if ids:
            set_tasks(model, ids[t])
        ex = read_json(path, fix="fix it (BIG-Bench Hard task file: {\"examples\": [{\"input\", \"target\"}]})").get("examples")
        if not isinstance(ex, list) or not ex or not all(
                isinstance(e, dict) and isinstance(e.get("input"), str) and isinstance(e.get("target"), str) for e in ex):
            raise EvalError(f"{path}: needs a non-empty 'examples' list of objects with string input and target: "
                            f"fix it, or leave {t} out (--subjects)")
        ex = ex[:limit or None]
        gens = generate_texts(model, tok, [_prompt(e["input"], prompt) for e in ex], max_new_tokens, batch_size, t,
                              progress)
        ps = [{"task": t, "index": i, "target": e["target"], "generation": g, "correct": bbh_match(g, e["target"])}
              for i, (e, g) in enumerate(zip(ex, gens))]
        per_task[t] = {"acc": sum(p["correct"] for p in ps) / len(ps), "n": len(ps)}
        preds += ps
    return {"task": "bbh", "n": len(preds), "accuracy": sum(v["acc"] for v in per_task.values()) / len(per_task),
            "micro": sum(p["correct"] for p in preds) / len(preds), "tasks": per_task, "prompt": prompt,
            "predictions": preds}


# -----------------------------------------------------------------------------
# command line


def load_model(cfg: EvalConfig):
    """-> (model, tok): base / merged checkpoint, optionally with a saved adapter on top."""
    from model import Tokenizer, Transformer
    for flag, path in (("--model", cfg.model), ("--adapter", cfg.adapter), ("--tokenizer", cfg.tokenizer)):
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path} is not a directory")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32  # CPUs without native bf16 run it ~40x slower
    else:
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if cfg.dtype not in dtypes:
            raise EvalError(f"--dtype {cfg.dtype!r}: choose auto, fp32, bf16 or fp16")
        dtype = dtypes[cfg.dtype]
    model = Transformer.from_pretrained(cfg.model, dtype=dtype, device=device)
    if cfg.adapter:
        try:
            import adapters
        except ImportError:
            raise EvalError("--adapter needs adapters.py next to eval_mmlu.py") from None
        adapters.load_adapter(model, cfg.adapter)
        model.to(device)
    model.eval()
    return model, Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)


def report(res):
    """A short human-readable summary of a results dict."""
    if res["task"] == "mmlu":
        fewer = f" ({res['reduced_shots']} with fewer shots to fit {res['max_len']} tokens)" if res["reduced_shots"] else ""
        lines = [f"MMLU {res['split']} {res['shots']}-shot: {res['n']} questions{fewer}"]
        if len(res["subjects"]) <= 12:
            lines += [f"  {s:<40s} {v['acc']:.4f}  (n={v['n']})" for s, v in res["subjects"].items()]
        lines += [f"  {c:<40s} {v['acc']:.4f}  (n={v['n']})" for c, v in res["categories"].items()]
        lines += [f"  {'overall (micro)':<40s} {res['accuracy']:.4f}",
                  f"  {'macro (mean over subjects)':<40s} {res['macro']:.4f}"]
    elif res["task"] == "bbh":
        lines = [f"BBH zero-shot ({res['prompt']} prompt): {res['n']} examples"]
        lines += [f"  {t:<40s} {v['acc']:.4f}  (n={v['n']})" for t, v in res["tasks"].items()]
        lines += [f"  {'average over tasks':<40s} {res['accuracy']:.4f}"]
    else:
        lines = [f"GSM8K ({res['prompt']} prompt): {res['n']} problems, accuracy {res['accuracy']:.4f}"]
    return "\n".join(lines)


def is_results(path):
    """Whether path holds results this script wrote (a JSON object with "task" and "predictions")."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(d, dict) and "task" in d and "predictions" in d


def probe(model, tok):
    """One short forward before any scoring: a base or adapter that gives NaN logits (NaN weights, a negative
    rope_theta) is refused in one line, for every task (generation would otherwise decode token 0 forever)."""
    ids = encode_prompt(tok, "Answer:")
    if any(getattr(m, "task_gated", False) for m in model.modules()):
        set_tasks(model, 0)  # any task: the evaluation sets each prompt's own before scoring
    check_finite(tail_logits(model, [ids], 1), "on a probe prompt")


def parse_args(argv=None) -> EvalConfig:
    from adapters import add_dataclass_args, dataclass_from_args  # one flag generator for every script
    p = ArgParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, EvalConfig)
    return dataclass_from_args(EvalConfig, p.parse_args(argv))


def run(cfg: EvalConfig, model=None, tok=None, progress=True):
    """Python API for the whole command: evaluate cfg.task, write cfg.out if set, return the results."""
    if cfg.task not in ("mmlu", "gsm8k", "bbh"):
        raise EvalError(f"--task {cfg.task!r}: choose mmlu, gsm8k or bbh")
    if not cfg.data:
        raise EvalError("--data is required: the MMLU CSV folder, GSM8K test.jsonl or BBH folder")
    for name, lo in (("shots", 0), ("batch_size", 1), ("limit", 0), ("max_len", 1), ("max_new_tokens", 0)):
        if getattr(cfg, name) < lo:
            raise EvalError(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.device != "auto":
        check_device(cfg.device)
    if cfg.out and any(a.exists() and not a.is_dir() for a in Path(cfg.out).parents):  # refused before scoring
        raise EvalError(f"--out {cfg.out}: a folder above it is a file: choose another path")
    if cfg.out and Path(cfg.out).is_dir():
        raise EvalError(f"--out {cfg.out} is a folder: name the results file, e.g. {Path(cfg.out) / 'results.json'}")
    if cfg.out and Path(cfg.out).is_file() and not is_results(Path(cfg.out)):  # e.g. a CSV named by mistake
        raise EvalError(f"--out {cfg.out} exists and is not an eval_mmlu.py results file: choose another path "
                        f"(a results file from an earlier run is replaced)")
    if model is None:
        if not cfg.model:
            raise EvalError("--model DIR is required")
        model, tok = load_model(cfg)
        probe(model, tok)
    subjects = [s for s in cfg.subjects.split(",") if s] if cfg.subjects else None
    if cfg.task == "mmlu":
        res = evaluate_mmlu(model, tok, cfg.data, cfg.shots, cfg.split, cfg.max_len, cfg.batch_size,
                            subjects, cfg.limit, progress, cfg.task_id)
    elif cfg.task == "gsm8k":
        res = evaluate_gsm8k(model, tok, cfg.data, cfg.limit, cfg.max_new_tokens or 256, cfg.prompt, cfg.batch_size,
                             progress, cfg.task_id)
    else:
        res = evaluate_bbh(model, tok, cfg.data, subjects, cfg.limit, cfg.max_new_tokens or 64, cfg.prompt,
                           cfg.batch_size, progress, cfg.task_id)
    res.update({"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data})
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: p.write_text(json.dumps(res, indent=1) + "\n"))
    return res


def main(argv=None):
    cfg = parse_args(argv)
    with one_line_errors():
        res = run(cfg)
    print(report(res))
    if cfg.out:
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
