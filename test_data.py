"""Tests for prepare_data.py: the template, masks, cuts, malformed records, the files of CONTRACT.md,
the recipes' field mappings, command-line errors and the synthetic recipe's files (synthetic.py's
made-up world itself is tested in test_demo.py). The tokenizer is a tiny
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
# the synthetic recipe (its made-up world, synthetic.py: test_demo.py)


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
