"""Tests for prepare_data.py: the template, masks, cuts, malformed records, the files of CONTRACT.md,
the recipes' field mappings, command-line errors and the synthetic set. The tokenizer is a tiny
Llama-3-style tokenizer.json trained by conftest.write_tokenizer; the `tokenizers` object it returns is
the independent reference for token ids."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import eval_mmlu
import prepare_data as P
import synthetic as S
from conftest import write_tokenizer
from model import Tokenizer

SHARED = Path(__file__).parent.parent / "shared" / "data"

# The Alpaca template, written out here by hand (Taori et al. 2023), as the specification.
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
            "\n\n### Instruction:\n{i}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, "json")
    return d


@pytest.fixture(scope="module")
def ref(tok_dir):
    from tokenizers import Tokenizer as HFTokenizer
    return HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(argv, capsys=None):
    P.main([str(a) for a in argv])
    return capsys.readouterr() if capsys else None


def examples(out, split):
    ids, mask, idx, task = P.read_split(out, split)
    return [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(idx[:-1], idx[1:])], task


RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Translate to French:\nthe dog", "input": "", "output": "le chien\n(masculine)"},
    {"instruction": "Summarise.", "input": "Low-rank adaptation freezes W0.", "output": " It trains A and B only. "},
]


def test_format_prompt_is_the_alpaca_template():
    assert P.format_prompt("Do X.", "") == NO_INPUT.format(i="Do X.")
    assert P.format_prompt("Do X.", "with this") == WITH_INPUT.format(i="Do X.", x="with this")
    assert P.TEMPLATE_NAME == "alpaca"


def test_template_round_trips():
    for r in RECORDS + [{"instruction": "multi\n\nline ### x", "input": "a\nb"}]:
        assert P.parse_prompt(P.format_prompt(r["instruction"], r["input"])) == (r["instruction"], r["input"])
    with pytest.raises(ValueError, match="PROMPT_TEMPLATE"):
        P.parse_prompt("Question: what?\nAnswer:")


def test_masks_cover_exactly_the_response_and_eos(tmp_path, tok_dir, tok, ref):
    f = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    run(["jsonl", "--model", tok_dir, "--input", f, "--out", tmp_path / "out", "--val_frac", 0])
    exs, task = examples(tmp_path / "out", "train")
    assert task is None and len(exs) == len(RECORDS)
    bos, eos = ref.token_to_id("<|begin_of_text|>"), ref.token_to_id("<|end_of_text|>")
    for (ids, mask), r in zip(exs, RECORDS):
        prompt = (WITH_INPUT if r["input"] else NO_INPUT).format(i=r["instruction"], x=r["input"])
        p_ids = ref.encode(prompt, add_special_tokens=False).ids
        r_ids = ref.encode(r["output"], add_special_tokens=False).ids
        assert ids == [bos] + p_ids + r_ids + [eos]                      # reference tokenizer, hand-built prompt
        assert mask == [0] * (1 + len(p_ids)) + [1] * (len(r_ids) + 1)   # loss on response + EOS only
        # the template round-trips through the files: decode -> prompt text -> (instruction, input)
        n_prompt = mask.index(1)
        assert tok.decode(ids[1:n_prompt]) == prompt
        assert P.parse_prompt(tok.decode(ids[1:n_prompt])) == (r["instruction"], r["input"])
        assert tok.decode(ids[n_prompt:-1]) == r["output"]


def test_cut_and_malformed_counts(tmp_path, tok_dir, tok, capsys):
    long_out = " ".join(["word"] * 400)
    rows = [
        {"instruction": "ok one", "output": "fine"},                     # line 1
        '{"instruction": "broken", "output": ',                            # line 2: invalid JSON
        {"instruction": "ok two", "input": "ctx", "output": "fine too"},  # line 3
        "",                                                               # line 4: blank, ignored
        {"instruction": "no output here"},                                # line 5: missing field
        '["a", "list"]',                                                  # line 6: not an object
        {"instruction": "number", "output": 7},                           # line 7: not a string
        {"instruction": "long answer", "output": long_out},               # line 8: cut inside the response
        {"instruction": "long " * 300, "output": "never seen"},           # line 9: cut inside the prompt -> dropped
        {"instruction": "empty", "output": "   "},                        # line 10: empty response
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    cutoff = 160  # the with-input prompt alone is ~120 tokens with this tiny vocabulary
    out = run(["jsonl", "--model", tok_dir, "--input", f, "--out", tmp_path / "o", "--cutoff", cutoff,
               "--val_frac", 0], capsys).out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["n_malformed"] == 5 and meta["n_cut"] == 2
    assert "5 malformed record(s), first at line 2: invalid JSON" in out
    assert "cut 2 of 4 examples at --cutoff 160" in out and "dropped 1" in out
    exs, _ = examples(tmp_path / "o", "train")
    assert len(exs) == 3 and meta["splits"]["train"]["examples"] == 3
    assert all(len(ids) <= cutoff for ids, _ in exs)
    ids, mask = exs[2]  # the cut one: exactly cutoff tokens, response up to the cut, no EOS
    assert len(ids) == cutoff and ids[-1] != tok.eos_id and mask[-1] == 1
    n_prompt = mask.index(1)
    assert long_out.startswith(tok.decode(ids[n_prompt:]))


def test_meta_and_files_follow_the_contract(tmp_path, tok_dir, tok):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}", "kind": ["math", "law", "code"][i % 3]}
            for i in range(47)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    base = ["jsonl", "--model", tok_dir, "--input", f, "--task_field", "kind"]
    run(base + ["--out", tmp_path / "a", "--seed", 1])
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert set(meta) == {"format", "tokenizer", "vocab_size", "cutoff", "template", "recipe", "splits", "tasks",
                         "n_cut", "n_malformed"}
    assert meta["format"] == "nanomasa-sft-v1" and meta["tokenizer"] == tok.fingerprint
    assert meta["vocab_size"] == tok.n_vocab and meta["cutoff"] == 1024 and meta["template"] == "alpaca"
    assert meta["recipe"] == "jsonl" and meta["tasks"] == ["code", "law", "math"]
    assert meta["n_cut"] == 0 and meta["n_malformed"] == 0
    assert meta["splits"]["val"]["examples"] == 5 and meta["splits"]["train"]["examples"] == 42  # 10% of 47, rounded
    seen = {}
    for split in ("train", "val"):
        d = tmp_path / "a"
        idx, task = np.load(d / f"{split}.idx.npy"), np.load(d / f"{split}.task.npy")
        assert idx.dtype == np.int64 and task.dtype == np.int32 and idx[0] == 0 and np.all(np.diff(idx) > 0)
        n, t = meta["splits"][split]["examples"], meta["splits"][split]["tokens"]
        assert len(idx) == n + 1 and idx[-1] == t and len(task) == n
        assert (d / f"{split}.bin").stat().st_size == 4 * t and (d / f"{split}.mask.bin").stat().st_size == t
        for (ids, mask), k in zip(examples(d, split)[0], task):
            i = int(re.search(r"answer (\d+)", tok.decode(ids)).group(1))
            assert meta["tasks"][k] == rows[i]["kind"]
            seen[i] = split
    assert sorted(seen) == list(range(47))                 # every record once, in exactly one split
    assert not list((tmp_path / "a").glob("*.tmp"))        # temporary names all renamed
    # the split is seeded: same seed, same split; another seed, another split
    run(base + ["--out", tmp_path / "b", "--seed", 1])
    run(base + ["--out", tmp_path / "c", "--seed", 2])
    val = lambda d: np.fromfile(d / "val.bin", dtype=np.uint32).tolist()
    assert val(tmp_path / "b") == val(tmp_path / "a") and val(tmp_path / "c") != val(tmp_path / "a")


def test_recipes_map_their_fields(tmp_path, tok):
    dolly = {"instruction": "Why?", "context": "Because.", "response": "So.", "category": "open_qa"}
    assert P._dolly(dolly) == {"instruction": "Why?", "input": "Because.", "output": "So.", "task": "open_qa"}
    orca = {"id": "x", "system_prompt": "You are helpful.", "question": "Q?", "response": "A."}
    assert P._openorca(orca) == {"instruction": "You are helpful.\n\nQ?", "input": "", "output": "A."}
    assert P._openorca({**orca, "system_prompt": ""})["instruction"] == "Q?"
    ust = {"masked_sentences": ["The <mask> was filed."], "obj_label": "complaint", "legal_topic": "x"}
    assert P._usterms(ust) == {"instruction": P.USTERMS_INSTRUCTION, "input": "The <mask> was filed.",
                               "output": "complaint"}
    # Lawyer-Instruct ships as one JSON array: malformed entries are reported by record number
    f = tmp_path / "law.json"
    f.write_text(json.dumps([{"instruction": "I", "output": "O"}, {"instruction": "no output"}, 3]))
    bad = P.Malformed()
    recs = P.load_records(P.DataConfig(recipe="lawyer", input=str(f)), bad)
    assert recs == [{"instruction": "I", "input": "", "output": "O"}]
    assert bad.n == 2 and bad.first == "record 2: missing field 'output'"  # the earliest, not the first found
    # GSM8K: the real training file, every record kept, solution verbatim with its "#### N" line
    gsm = SHARED / "gsm8k" / "train.jsonl"
    bad = P.Malformed()
    recs = P.load_records(P.DataConfig(recipe="gsm8k", input=str(gsm)), bad)
    first = json.loads(gsm.read_text().splitlines()[0])
    assert len(recs) == 7473 and bad.n == 0
    assert recs[0] == {"instruction": first["question"], "input": "", "output": first["answer"]}
    assert all(re.search(r"\n#### \S+$", r["output"]) for r in recs)


def test_recipes_combine_into_tasks(tmp_path, tok_dir, tok, capsys):
    law = tmp_path / "law.json"
    law.write_text(json.dumps([{"instruction": f"Law question {i}?", "input": "", "output": f"ruling {i}"}
                               for i in range(6)]))
    terms = write_jsonl(tmp_path / "terms.jsonl", [{"masked_sentences": [f"The <mask> number {i}."],
                                                    "obj_label": f"term {i}"} for i in range(4)])
    run(["lawyer,usterms", "--model", tok_dir, "--input", f"{law},{terms}", "--out", tmp_path / "o", "--val_frac", 0])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["recipe"] == "lawyer,usterms" and meta["tasks"] == ["lawyer", "usterms"]
    exs, task = examples(tmp_path / "o", "train")
    kinds = ["usterms" if "<mask>" in tok.decode(ids) else "lawyer" for ids, _ in exs]
    assert [meta["tasks"][k] for k in task] == kinds and kinds.count("usterms") == 4
    with pytest.raises(SystemExit):
        run(["lawyer,usterms", "--model", tok_dir, "--input", str(law), "--out", tmp_path / "p"])
    assert "2 recipes but 1 --input files" in capsys.readouterr().err


def test_command_line_errors_are_one_line(tmp_path, tok_dir, capsys):
    def err(argv):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    assert "unknown recipe 'alpaca'" in err(["alpaca", "--model", tok_dir, "--input", f, "--out", tmp_path / "o"])
    msg = err(["jsonl", "--model", tok_dir, "--input", f, "--out", tmp_path / "o"])
    assert "field 'instruction'" in msg and "--instruction_field" in msg and "question, answer" in msg
    msg = err(["dolly", "--model", tok_dir, "--input", f, "--out", tmp_path / "o"])
    assert "field 'instruction'" in msg and "jsonl recipe" in msg
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    assert "no usable records" in err(["jsonl", "--model", tok_dir, "--input", empty, "--out", tmp_path / "o"])
    bad = write_jsonl(tmp_path / "b.jsonl", ['{"instruction": 1, "output": "x"}', "{nope"])
    msg = err(["jsonl", "--model", tok_dir, "--input", bad, "--out", tmp_path / "o"])
    assert "no usable records" in msg and "2 malformed record(s), first at line 1" in msg
    assert "not found" in err(["jsonl", "--model", tok_dir, "--input", tmp_path / "nope.jsonl", "--out", tmp_path / "o"])
    assert "--model" in err(["gsm8k", "--input", f, "--out", tmp_path / "o"])
    msg = err(["synthetic", "--model", tok_dir, "--out", tmp_path / "o", "--no-syn_mc_train", "--no-syn_open_form"])
    assert "no training record" in msg and "drop one" in msg
    msg = err(["synthetic", "--model", tok_dir, "--out", tmp_path / "o", "--no-syn_mc_train"])  # MC-only tasks
    assert "no training record for --syn_tasks parity," in msg and "addition" in msg
    msg = err(["synthetic", "--model", tok_dir, "--out", tmp_path / "o", "--syn_tasks", "parity,sums"])
    assert "unknown synthetic task 'sums'" in msg and "vowel" in msg
    assert "names a task twice" in err(["synthetic", "--model", tok_dir, "--out", tmp_path / "o", "--syn_tasks",
                                        "parity,vowel,parity"])
    assert not (tmp_path / "o" / "meta.json").exists()


# -----------------------------------------------------------------------------
# synthetic


ALL = S.SYNTHETIC_TASKS  # the default tasks and the selectable ones


def test_synthetic_set_is_deterministic_from_its_seed():
    a, b, c = (P.synthetic_records(s, n_train=60, n_test=20, tasks=ALL) for s in (0, 0, 1))
    assert a == b and a != c
    assert S.synthetic_heldout(0, 60, 20, ALL) == S.synthetic_heldout(0, 60, 20, ALL) != S.synthetic_heldout(1, 60, 20, ALL)
    # the default is a subset, the same items as when chosen among all (each task has its own RNG)
    assert S.synthetic_heldout(0, 60, 20)["test"] == {t: S.synthetic_heldout(0, 60, 20, ALL)["test"][t]
                                                      for t in S.SYNTHETIC_DEFAULT}


def mc_item(prompt):
    """A zero-shot MMLU prompt -> (question, frozenset of its four options)."""
    q, *opts = mc_item_rows(prompt)
    return q, frozenset(opts)


def test_synthetic_heldout_items_never_reach_training():
    held = S.synthetic_heldout(0, n_train=200, n_test=40, tasks=ALL)
    train = P.synthetic_records(0, n_train=200, n_test=40, tasks=ALL)
    text = "\n".join(r.get("prompt", "") + r.get("instruction", "") for r in train)
    items = {mc_item(r["prompt"]) for r in train if "prompt" in r}
    for split in ("dev", "test"):
        for task, rows in held[split].items():
            assert rows and not {(row[0], frozenset(row[1:5])) for row in rows} & items, (split, task)
            if task in S.SYNTHETIC_OPEN_FORM:  # the others' questions are shared wordings; the item is the options
                assert all(row[0] not in text for row in rows), (split, task)
    # the held-out addition / maximum / reverse problems are new problems, not only new wordings
    train_q = {r["instruction"] for r in train if "instruction" in r}
    for task in ("addition", "maximum", "reverse"):
        assert not {row[0] for row in held["test"][task]} & train_q


def test_synthetic_answers_are_correct_by_construction():
    held = S.synthetic_heldout(3, n_train=100, n_test=50, tasks=ALL)
    train = P.synthetic_records(3, n_train=100, n_test=50, tasks=ALL)
    facts = {r["instruction"]: r["output"] for r in train if r["task"] == "world" and "instruction" in r}
    for task, rows in held["test"].items():
        counts = [sum(r[5] == L for r in rows) for L in "ABCD"]
        assert max(counts) - min(counts) <= 1  # balanced answer letters: a constant guess scores 25%
        for q, *opts, letter in rows:
            assert len(set(opts)) == 4 and letter in "ABCD"
            a = opts["ABCD".index(letter)]
            if task == "addition":
                x, y = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q).groups())
                assert a == str(x + y)
            elif task == "maximum":
                assert a == str(max(map(int, re.findall(r"\d+", q))))
            elif task == "reverse":
                assert a == re.fullmatch(r"Reverse the letters of the word '(\w+)'\.", q).group(1)[::-1]
            elif task == "parity":  # the one number of the asked parity
                want = {"Which option is even?": 0, "Which option is odd?": 1}[q]
                assert [int(o) % 2 == want for o in opts] == [o == a for o in opts]
            elif task == "multiple":  # the one multiple of 5
                assert q == "Which option is a multiple of 5?" and [int(o) % 5 == 0 for o in opts] == [o == a for o in opts]
            elif task == "letter":  # the one word with the asked letter; every other word has another rare letter
                c = re.fullmatch(r"Which option contains the letter (\w)\?", q).group(1)
                assert [c in o for o in opts] == [o == a for o in opts]
                assert all(len(set(o) & set("jwxy")) == 1 for o in opts)
            elif task == "vowel":  # the one word ending in a vowel
                assert q == "Which option ends with a vowel?" and [o[-1] in "aeiou" for o in opts] == [o == a for o in opts]
            elif task == "zorbia":  # checked over all items below: one consistent set of customs
                assert re.fullmatch(r"Which option is (sacred|forbidden) in Zorbia\?", q)
            elif task == "threshold":  # the one number on the asked side of 50
                greater = {"Which option is greater than 50?": True, "Which option is less than 50?": False}[q]
                assert all(int(o) != 50 for o in opts) and [(int(o) > 50) == greater for o in opts] == [o == a for o in opts]
            else:  # the world fact taught in training (other wording) gives the same answer
                rel, c = {"What is the capital of": "capital", "Who rules": "ruler",
                          "What is the national animal of": "animal"}, q.rstrip("?").rsplit(" ", 1)[1]
                wording = next(S.WORLD_RELATIONS[v][1] for k, v in rel.items() if q.startswith(k))
                assert facts[wording.format(c=c)] == a
    # Zorbia's customs: 10 sacred and 10 forbidden words; in every item, held-out or training, the answer
    # has the asked custom and no distractor has it
    rows = [(row[0], row[1:5], row[1 + "ABCD".index(row[5])]) for split in held.values() for row in split["zorbia"]]
    rows += [(q, opts, opts["ABCD".index(r["output"].strip())]) for r in train if r["task"] == "zorbia"
             for q, *opts in [mc_item_rows(r["prompt"])]]
    has = {law: {a for q, _, a in rows if law in q} for law in ("sacred", "forbidden")}
    assert len(has["sacred"]) == len(has["forbidden"]) == 10 and not has["sacred"] & has["forbidden"]
    assert all(not (set(opts) - {a}) & has[law] for q, opts, a in rows for law in has if law in q)
    # the MC training items are rendered exactly as eval_mmlu renders a zero-shot question
    mc = [r for r in train if "prompt" in r]
    assert mc and all(r["prompt"].endswith("\nAnswer:") and re.fullmatch(r" [ABCD]", r["output"]) for r in mc)
    assert all(r["prompt"].startswith("The following are multiple choice questions (with answers) about  ")
               for r in mc)


def test_synthetic_quiz_is_deterministic_correct_and_asks_nothing_the_tasks_ask():
    recs = P.synthetic_quiz_records(0, 3000)
    assert recs == P.synthetic_quiz_records(0, 3000) != P.synthetic_quiz_records(1, 3000)
    task_questions = {row[0] for rows in S.synthetic_heldout(0, 200, 40, ALL)["test"].values() for row in rows}
    letters, kinds = [], set()
    for r in recs:
        q, *opts = mc_item_rows(r["prompt"])
        letter = r["output"].strip()
        assert r["prompt"] == eval_mmlu.mmlu_prompt("quiz", [], [q, *opts, letter]) and r["output"] == " " + letter
        a = opts["ABCD".index(letter)]
        letters.append(letter)
        assert len(set(opts)) == 4 and q not in task_questions
        assert not re.search(r"even|odd|multiple|the letter|vowel|Zorbia|greater|less|\+|largest|revers|capital of|rule|"
                             r"national", q), q
        kind = lambda s: "number" if s.isdigit() else "name" if s[0].isupper() else "word"
        cat = re.fullmatch(r"Which option is an? (\w+)\?", q)
        if cat and cat[1] in ("number", "word", "name"):
            right = [kind(o) == cat[1] for o in opts]
        elif cat and cat[1] in S.QUIZ_CATEGORIES:
            right = [o in S.QUIZ_CATEGORIES[cat[1]] for o in opts]
        elif q == "Which option is in capital letters?":
            right = [o.isupper() for o in opts]
        elif q == "Which option has an exclamation mark?":
            right = ["!" in o for o in opts]
        elif m := re.fullmatch(r"Which option has (one|two|three) words?\?", q):
            right = [len(o.split()) == {"one": 1, "two": 2, "three": 3}[m[1]] for o in opts]
        else:
            right = [q == f"Which option is {o}?" for o in opts]
        assert right == [o == a for o in opts], (q, opts, letter)  # the answer, and only the answer, is right
        kinds.add(cat[1] if cat else q.split(" ", 3)[3] if q.startswith("Which option has") else q[:20])
    assert {"number", "word", "name", *S.QUIZ_CATEGORIES} <= kinds
    assert max(map(letters.count, "ABCD")) - min(map(letters.count, "ABCD")) < 150  # letters ~uniform


def mc_item_rows(prompt):
    """A zero-shot MMLU prompt -> [question, A, B, C, D]."""
    q, *opts = prompt.split("\n\n", 1)[1].split("\n")[:5]
    return [q, *(o[3:] for o in opts)]


def test_synthetic_command_writes_training_files_and_mmlu_csvs(tmp_path, tok_dir):
    out = tmp_path / "syn"
    run(["synthetic", "--model", tok_dir, "--out", out, "--syn_train", 40, "--syn_test", 10, "--seed", 5])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tasks"] == sorted(S.SYNTHETIC_DEFAULT) and meta["recipe"] == "synthetic"
    assert meta["synthetic"] == {"seed": 5, "tasks": list(S.SYNTHETIC_DEFAULT), "train": 40, "test": 10,
                                 "mc_train": True, "open_form": True}
    held = S.synthetic_heldout(5, 40, 10)
    for split in ("dev", "test"):
        files = eval_mmlu.subject_files(out / "mmlu", split)
        assert sorted(files) == sorted(S.SYNTHETIC_DEFAULT)
        for task, path in files.items():
            assert eval_mmlu.read_csv(path) == held[split][task]
    cats = eval_mmlu.load_categories(out / "mmlu")
    assert sorted(cats["subject_to_category"]) == sorted(S.SYNTHETIC_DEFAULT)
    assert cats["subject_to_category"]["zorbia"] == "world" and cats["subject_to_category"]["letter"] == "strings"
    n_train = len(P.synthetic_records(5, 40, 10))
    assert meta["splits"]["train"]["examples"] + meta["splits"]["val"]["examples"] == n_train
    # --syn_tasks picks others: only their files, only their categories
    run(["synthetic", "--model", tok_dir, "--out", out, "--syn_train", 40, "--syn_test", 10, "--syn_tasks",
         "addition,world"])
    assert sorted(eval_mmlu.subject_files(out / "mmlu", "test")) == ["addition", "world"]
    assert sorted(eval_mmlu.load_categories(out / "mmlu")["categories"]) == ["arithmetic", "world"]
    assert json.loads((out / "meta.json").read_text())["tasks"] == ["addition", "world"]
