"""
Tests for the offline demo: synthetic.py's made-up world, as prepare_data.py's synthetic recipes render it,
and demo.py. The synthetic fine-tuning set (determinism, held-out items never in training, answers correct
by construction) and the quiz stage; the same properties for the base model's pretraining text
(synthetic_pretrain_texts); the pure-Python BPE tokenizer writer (write_bpe_tokenizer); and a smoke run of
the whole pipeline at a tiny size. (The synthetic recipe's command and files: test_data.py.)

    .venv/bin/python -m pytest -q test_demo.py
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import demo
import prepare_data as P
import synthetic as S
from eval_mmlu import mmlu_prompt
from model import Tokenizer, Transformer

N_TRAIN, N_TEST = 200, 40


# -----------------------------------------------------------------------------
# the fine-tuning set and the quiz stage (synthetic.py, rendered by prepare_data.py's recipes)


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
        assert r["prompt"] == mmlu_prompt("quiz", [], [q, *opts, letter]) and r["output"] == " " + letter
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


# -----------------------------------------------------------------------------
# the base's pretraining text and tokenizer


@pytest.fixture(scope="module")
def texts():
    return S.synthetic_pretrain_texts(0, N_TRAIN, N_TEST)


def test_pretrain_text_is_deterministic_from_its_seed(texts):
    assert S.synthetic_pretrain_texts(0, N_TRAIN, N_TEST) == texts != S.synthetic_pretrain_texts(1, N_TRAIN, N_TEST)


def test_pretrain_facts_are_correct_by_construction(texts):
    world = {p.key: p.answer for p in S.synthetic_problems(0, "world", 1000)}
    n = 0
    for line in "\n".join(texts).split("\n"):
        if m := re.fullmatch(r"In the list \(a\) (\w+), \(b\) (\w+), \(c\) (\w+), \(d\) (\w+), (\w+) is \(([abcd])\)\.", line):
            # lookup line: four distinct values, the label names the queried value's position
            assert len(set(m.group(1, 2, 3, 4))) == 4 and m["abcd".index(m[6]) + 1] == m[5], line
            n += 1
            continue
        if m := re.fullmatch(r"(.*)Among (\S+), (\S+), (\S+) and (\S+), (.*) (\S+)\.", line):
            # selection line: four distinct candidates, the named one among them, and the claim is right
            assert len({m[2], m[3], m[4], m[5]}) == 4 and m[7] in m.group(2, 3, 4, 5), line
            if m[1]:  # "<question> Among ..., the answer is X."
                assert m[6] == "the answer is"
                if q := re.fullmatch(r"What is (\d+) \+ (\d+)\? ", m[1]):
                    assert int(q[1]) + int(q[2]) == int(m[7]), line
                elif q := re.fullmatch(r"Which is the largest of (\d+), (\d+) and (\d+)\? ", m[1]):
                    assert max(map(int, q.group(1, 2, 3))) == int(m[7]), line
                else:
                    q = re.fullmatch(r"Reverse the letters of the word '(\w+)'\. ", m[1])
                    assert q[1][::-1] == m[7], line
                n += 1
                continue
            line = m[6][0].upper() + m[6][1:] + " " + m[7] + "."  # "Among ..., the capital of C is V."
        if m := re.fullmatch(r"(\d+) \+ (\d+) = (\d+)\.", line):
            assert int(m[1]) + int(m[2]) == int(m[3]), line
        elif m := re.fullmatch(r"The largest of (\d+), (\d+) and (\d+) is (\d+)\.", line):
            assert max(map(int, m.group(1, 2, 3))) == int(m[4]), line
        elif m := re.fullmatch(r"The word '(\w+)' reversed is '(\w+)'\.", line):
            assert m[1][::-1] == m[2], line
        elif m := re.fullmatch(r"The capital of (\w+) is (\w+)\.", line):
            assert world[f"capital:{m[1]}"] == m[2], line
        elif m := re.fullmatch(r"(\w+) is ruled by (\w+)\.", line):
            assert world[f"ruler:{m[1]}"] == m[2], line
        elif m := re.fullmatch(r"The national animal of (\w+) is the (\w+)\.", line):
            assert world[f"animal:{m[1]}"] == m[2], line
        else:
            raise AssertionError(f"unexpected pretraining line {line!r}")
        n += 1
    assert n > 10000


def test_pretrain_text_holds_no_heldout_problem_and_no_multiple_choice_format(texts):
    body = "\n".join(texts)
    assert "Answer:" not in body and not re.search(r"^[ABCD]\. ", body, re.M)
    # nor a word of what the default tasks ask (parity, multiples of 5, letters, vowels, Zorbia's customs)
    assert not re.search(r"\b(even|odd|multiple|letter|vowel|Zorbia|sacred|forbidden)\b", body, re.I)
    lines = set(body.split("\n"))
    for task in ("addition", "maximum", "reverse"):
        dev, test, train = S.split_pool(0, task, N_TRAIN, N_TEST)
        for p in dev + test:
            if task == "addition":
                a, b = p.key.split("+")
                assert not any(x.startswith(f"{a} + {b} =") for x in lines) and f"What is {a} + {b}?" not in body
            elif task == "maximum":
                x = p.key.split(",")
                assert f"of {x[0]}, {x[1]} and {x[2]}" not in body
            else:
                assert f"word '{p.key}'" not in body  # neither "The word 'w' reversed" nor "... of the word 'w'."
        # and the training pool does reach pretraining (the check above is not vacuous)
        if task == "addition":
            a, b = train[0].key.split("+")
            assert f"{a} + {b} = {int(a) + int(b)}." in lines


def test_bpe_tokenizer_equals_huggingface_tokenizers_and_keeps_answer_letters_whole(tmp_path, texts):
    tokenizers = pytest.importorskip("tokenizers")  # test-only reference
    prompts = [r.get("prompt") or P.format_prompt(r["instruction"]) for r in P.synthetic_records(0, 30, 5)]
    n = S.write_bpe_tokenizer(tmp_path, texts[:300] + prompts, n_merges=120)
    tok = Tokenizer.from_pretrained(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.n_vocab == n == ref.get_vocab_size() == 256 + 120 + 2
    row = S.synthetic_heldout(0, 30, 5)["test"]["letter"][0]
    for s in texts[300:330] + prompts + [mmlu_prompt("letter", [], row) + " C", "Answer: B\n\nhello 123"]:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
    for letter in "ABCD":
        assert len(tok.encode(" " + letter)) == 1
    assert tok.encode("<|begin_of_text|>") == [tok.bos_id] and tok.eos_id == n - 1


def test_tokenizer_text_holds_no_heldout_item():
    cfg = demo.DemoConfig()
    text = "\n".join(demo.tokenizer_texts(cfg))
    held = S.synthetic_heldout(cfg.seed, cfg.syn_train, cfg.syn_test)
    rows = [(t, row) for split in held.values() for t, rs in split.items() for row in rs]
    assert len(rows) == 5 * (100 + S.N_DEV)
    assert not [row for t, row in rows if mmlu_prompt(t, [], row) in text]
    # the check is not vacuous: training items are there, rendered the same way
    train = P.synthetic_records(cfg.seed, 200, cfg.syn_test)
    assert all(r["prompt"] in text for r in train[:50])


def test_committed_base_tokenizer_is_the_one_rebuild_base_writes(tmp_path):
    """demo_base/ is `demo.py --rebuild_base` at this commit: its tokenizer is rebuilt byte for byte (a change
    to the pretraining text or the synthetic prompts that would change it fails here: rebuild the base)."""
    demo.write_tokenizer(demo.DemoConfig(), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (Path(demo.DemoConfig().base) / name).read_bytes(), name


def test_an_unknown_task_is_one_error_line_before_anything_is_built(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--tasks", "parity,sums", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: unknown synthetic task 'sums' in --tasks") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_demo_smoke_runs_the_whole_pipeline_and_reuses_what_is_built(tmp_path, capsys):
    cfg = demo.DemoConfig(out=str(tmp_path / "out"), base=str(tmp_path / "base"), syn_train=24, syn_test=8,
                          hidden=32, layers=2, heads=2, n_merges=40, base_steps=2, quiz_steps=2, quiz_items=40,
                          epochs=1.0, batch_size=4, grad_accum=2, nproc=2)
    res = demo.demo(cfg)
    # the base was pretrained by train.py and loads like any HF checkpoint
    base = Transformer.from_pretrained(cfg.base)
    init = json.loads((tmp_path / "out" / "base_work" / "init" / "config.json").read_text())
    assert json.loads((tmp_path / "base" / "config.json").read_text())["hidden_size"] == init["hidden_size"] == 32
    assert any(not torch.equal(p, q) for p, q in zip(base.state_dict().values(), Transformer.from_pretrained(
        tmp_path / "out" / "base_work" / "init").state_dict().values()))  # pretraining changed the weights
    stage1 = Transformer.from_pretrained(tmp_path / "out" / "base_work" / "pretrain_run" / "model")
    assert any(not torch.equal(p, q) for p, q in zip(base.state_dict().values(), stage1.state_dict().values()))
    quiz_meta = json.loads((tmp_path / "out" / "base_work" / "quiz_data" / "meta.json").read_text())
    assert quiz_meta["recipe"] == "synthetic_quiz"  # the second stage ran on the quizzes, after the first
    # results: every synthetic task before and after, accuracies in [0, 1], the table printed
    assert sorted(res["before"]["tasks"]) == sorted(res["after"]["tasks"]) == sorted(S.SYNTHETIC_DEFAULT)
    assert all(0 <= v <= 1 for r in ("before", "after") for v in res[r]["tasks"].values())
    assert res["before"]["n"] == {t: 8 for t in S.SYNTHETIC_DEFAULT}
    assert 0 < res["trainable"] and res["percent"] == pytest.approx(100 * res["trainable"] / (res["trainable"] + res["base_params"]))
    text = capsys.readouterr().out
    assert "| **overall** |" in text and "done in" in text and (tmp_path / "out" / "loss.txt").is_file()
    # a second run reuses the data, the adapter and the results
    adapter_time = (tmp_path / "out" / "masa" / "adapter.safetensors").stat().st_mtime_ns
    assert demo.demo(cfg) == res
    assert (tmp_path / "out" / "masa" / "adapter.safetensors").stat().st_mtime_ns == adapter_time
    assert "reusing" in capsys.readouterr().out
    # another seed: new data (other items), so the adapter is trained and evaluated again
    data_meta = tmp_path / "out" / "data" / "meta.json"
    res1 = demo.demo(replace(cfg, seed=1))
    assert json.loads(data_meta.read_text())["synthetic"]["seed"] == 1
    assert json.loads((tmp_path / "out" / "masa" / "run.json").read_text())["train"]["seed"] == 1
    assert "fine-tuning again" in capsys.readouterr().out
    assert res1 == json.loads((tmp_path / "out" / "results.json").read_text())
    # other settings alone (here the schedule): the data is reused, the adapter trained again
    data_time = data_meta.stat().st_mtime_ns
    demo.demo(replace(cfg, seed=1, epochs=2.0))
    assert data_meta.stat().st_mtime_ns == data_time and "fine-tuning again" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "masa" / "run.json").read_text())["train"]["epochs"] == 2.0


def test_compare_smoke_writes_a_table1_row_per_method_with_spread_over_seeds(tmp_path, monkeypatch, capsys):
    """demo.compare at a tiny size on the committed base, --grid all: two of issue 8's methods (a task-gated one,
    whose task ids come from the synthetic data, and a soft prompt; the Table-1 grid's runs take the same path),
    two seeds each, each method's lr the one of two with the lower final validation loss."""
    monkeypatch.setattr(demo, "COMPARE_METHODS", {})
    monkeypatch.setattr(demo, "COMPARE_EXTRA", {"MoELoRA": ["--adapter", "moelora", "--r", 4, "--num_a", 2],
                                                "Prompt tuning (P=4)": ["--adapter", "prompt_tuning",
                                                                        "--num_virtual_tokens", 4]})
    monkeypatch.setattr(demo, "COMPARE_SEEDS", (0, 1))
    monkeypatch.setattr(demo, "COMPARE_LRS", (1e-3, 3e-2))
    cfg = demo.DemoConfig(out=str(tmp_path / "out"), syn_train=12, syn_test=6, compare_epochs=1.0, batch_size=8,
                          grad_accum=1, nproc=1, compare=True, grid="all")
    demo.compare(cfg)
    table = (tmp_path / "out" / "compare.md").read_text()
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table.splitlines() if r.startswith("| ")}
    assert rows["method"] == ["params %", "lr", *sorted(S.SYNTHETIC_DEFAULT), "avg"]
    assert list(rows)[1:] == ["base (no fine-tuning)", "MoELoRA", "Prompt tuning (P=4)"]
    for name, slug in (("MoELoRA", "moelora"), ("Prompt tuning (P=4)", "prompt-tuning-p-4")):
        pct, lr, *accs = rows[name]
        val = {x: demo.final_val_loss(tmp_path / "out" / "compare" / f"{slug}-lr{x:g}-s0") for x in (1e-3, 3e-2)}
        assert float(lr) == min(val, key=val.get) and val[1e-3] != val[3e-2]
        assert (tmp_path / "out" / "compare" / f"{slug}-lr{lr}-s1" / "eval.json").is_file()  # seed 1: that lr only
        assert len(list((tmp_path / "out" / "compare").glob(f"{slug}-lr*-s1"))) == 1
        assert float(pct) > 0 and len(accs) == len(S.SYNTHETIC_DEFAULT) + 1 and all(re.fullmatch(r"\d+\.\d ± \d+\.\d", a) for a in accs), rows[name]
    run = next((tmp_path / "out" / "compare").glob("moelora-lr*-s1"))
    assert json.loads((run / "adapter.json").read_text())["tasks"] == sorted(S.SYNTHETIC_DEFAULT)
    with pytest.raises(ValueError, match="unknown grid"):
        demo.compare(demo.DemoConfig(out=str(tmp_path / "out"), compare=True, grid="some"))
