"""Tests for eval_mmlu.py against the real MMLU / GSM8K / BBH copies in ../shared/data: the prompt is the
protocol's text (built here by hand), the CSV reader keeps what pandas would lose, categories add up to
the published counts, scoring is checked with oracle / constant fake models and against an independent
transformers scorer on the same tiny checkpoint, and the GSM8K / BBH answer rules are pinned down."""
import json

import pytest
import torch
import torch.nn as nn

import eval_mmlu as E
from conftest import (LLAMA3_REGEX, LLAMA3_SPECIALS, MMLU, hand_example, hand_prompt, make_hf_checkpoint,
                      reference_scorer, rows_of)
from model import Tokenizer

SHARED = MMLU.parent  # ../shared/data


# -----------------------------------------------------------------------------
# tokenizers: conftest's tiny Llama-3-style one splits " B" into " " + "B"; this one, trained with a few
# exemplar lines added, has the single-token letters every real tokenizer has.


def write_letter_tokenizer(d):
    """Tiny byte-level BPE (Llama 3 regex and specials) whose " A".." D" are single tokens."""
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
    t = HFTok(models.BPE(ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    corpus = ["The following are multiple choice questions (with answers) about algebra and history.",
              "Which one is true?\nA. x\nB. y\nC. z\nD. w\nAnswer: A\n\nAnswer: B\n\nAnswer: C\n\nAnswer: D\n\n"] * 30
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(LLAMA3_SPECIALS[:10])
    bos = LLAMA3_SPECIALS[0]
    t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(t.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return t


def checkpoint(d, kind):
    """(dir, HF model, reference tokenizers.Tokenizer) with tokenizer kind "letters" or "split"."""
    if kind == "split":
        hf = make_hf_checkpoint(d, "llama3", tokenizer="json", max_position_embeddings=4096)
        from tokenizers import Tokenizer as HFTok
        return d, hf, HFTok.from_file(str(d / "tokenizer.json"))
    t = write_letter_tokenizer(d)
    hf = make_hf_checkpoint(d, "llama3", vocab_size=t.get_vocab_size(), max_position_embeddings=4096,
                            bos_token_id=t.token_to_id("<|begin_of_text|>"), eos_token_id=t.token_to_id("<|end_of_text|>"))
    return d, hf, t


@pytest.fixture(scope="module")
def letters_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("letters"), "letters")


@pytest.fixture(scope="module")
def split_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("split"), "split")


# -----------------------------------------------------------------------------
# the prompt


def test_prompt_matches_the_protocol_text_one_shot():
    # MMLU_PROTOCOL.md, "Prompt format", k = 1, copied verbatim
    expected = ("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
                "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    dev = E.read_csv(MMLU / "dev" / "abstract_algebra_dev.csv")
    test = E.read_csv(MMLU / "test" / "abstract_algebra_test.csv")
    assert E.mmlu_prompt("abstract_algebra", dev[:1], test[0]) == expected


@pytest.mark.parametrize("k", [0, 1, 5])
def test_prompt_matches_the_protocol_for_every_subject(k):
    for subject in sorted(E.subject_files(MMLU, "test")):
        dev, test = rows_of("dev", subject), rows_of("test", subject)
        our_dev = E.read_csv(MMLU / "dev" / f"{subject}_dev.csv")
        for i in (0, len(test) // 2, len(test) - 1):
            row = E.read_csv(MMLU / "test" / f"{subject}_test.csv")[i]
            assert E.mmlu_prompt(subject, our_dev[:k], row) == hand_prompt(subject, dev[:k], test[i]), (subject, i)


def test_none_option_stays_none_in_the_prompt():
    hits = [(s, r) for s in E.subject_files(MMLU, "test") for r in E.read_csv(MMLU / "test" / f"{s}_test.csv")
            if "None" in r[1:5]]
    assert len(hits) == 10  # PROVENANCE.md: 10 test options are exactly "None"
    s, r = hits[0]
    assert f"\n{'ABCD'[r[1:5].index('None')]}. None\n" in E.mmlu_prompt(s, [], r)


# -----------------------------------------------------------------------------
# the CSV reader


def test_csv_reader_edge_cases(tmp_path):
    f = tmp_path / "x_test.csv"
    f.write_bytes("\ufeff".encode() + b'"Two\r\nlines, and ""quotes""?",None,NA,"a, b",,A\r\n'
                  b"plain,1,2,3,4, D\r\n\r\n" b'"ends with newline\n",x,y,z,w,C')
    assert E.read_csv(f) == [['Two\r\nlines, and "quotes"?', "None", "NA", "a, b", "", "A"],
                             ["plain", "1", "2", "3", "4", "D"],
                             ["ends with newline\n", "x", "y", "z", "w", "C"]]
    f.write_text('ok,1,2,3,4,A\n"multi\nline",1,2,3,B\n')
    with pytest.raises(ValueError, match=r"line 3: 5 fields, expected 6"):
        E.read_csv(f)
    f.write_text("ok,1,2,3,4,E\n")
    with pytest.raises(ValueError, match=r"line 1: answer 'E' is not one of A B C D"):
        E.read_csv(f)


def test_reader_sees_every_real_record():
    counts, multiline, none = {}, 0, {"test": 0, "val": 0}
    for split in ("dev", "val", "test"):
        rows = [r for s in E.subject_files(MMLU, split) for r in E.read_csv(MMLU / split / f"{s}_{split}.csv")]
        counts[split] = len(rows)
        multiline += sum(any("\n" in x for x in r) for r in rows)
        if split in none:
            none[split] = sum(x == "None" for r in rows for x in r[1:5])
    assert counts == {"dev": 285, "val": 1531, "test": 14042}     # PROVENANCE.md verified counts
    assert multiline == 1285 and none == {"test": 10, "val": 2}


def test_any_folder_of_csvs(tmp_path):
    (tmp_path / "law_quiz.csv").write_text("q?,a,b,c,d,B\n")
    (tmp_path / "law_quiz_dev.csv").write_text("e?,a,b,c,d,A\n")
    assert E.subject_files(tmp_path, "test") == {"law_quiz": tmp_path / "law_quiz.csv"}
    assert E.subject_files(tmp_path, "dev") == {"law_quiz": tmp_path / "law_quiz_dev.csv"}
    with pytest.raises(FileNotFoundError, match="no val CSVs"):
        E.subject_files(tmp_path, "val")


# -----------------------------------------------------------------------------
# categories


def test_category_counts_equal_the_sums_from_categories_json():
    cats = json.loads((MMLU / "categories.json").read_text())
    sub_to_cat = {sub: c for c, subs in cats["categories"].items() for sub in subs}
    sizes = {s: len(rows_of("test", s)) for s in E.subject_files(MMLU, "test")}
    expected = {}
    for s, n in sizes.items():
        for sub in cats["subcategories"][s]:
            expected[sub_to_cat[sub]] = expected.get(sub_to_cat[sub], 0) + n
    preds = [{"subject": s, "correct": False} for s, n in sizes.items() for _ in range(n)]
    res = E.aggregate(preds, E.load_categories(MMLU))
    assert {c: v["n"] for c, v in res["categories"].items()} == expected
    # ... and equal the protocol's published numbers (hendrycks/test categories.py: anatomy is "other")
    assert expected == {"STEM": 3018, "humanities": 4705, "social sciences": 3077,
                        "other (business, health, misc.)": 3242}
    assert res["n"] == 14042 and sum(v["n"] for v in res["subcategories"].values()) == 14042
    assert cats["subject_to_category"]["anatomy"] == "other (business, health, misc.)"


# -----------------------------------------------------------------------------
# scoring with fake models: an oracle scores 100%, an always-"A" model scores the share of A answers

SUBJECTS = ["abstract_algebra", "anatomy", "high_school_geography", "moral_disputes", "sociology", "virology"]


class LetterModel(nn.Module):
    """Returns logits that favour one letter token after each prompt: the correct one (oracle, which
    reads the question back from the tokens) or always the same one."""

    def __init__(self, tok, vocab, answer_of=None, letter=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok, self.vocab, self.answer_of, self.letter = tok, vocab, answer_of, letter
        self.ids = {L: tok.encode(f"Answer: {L}")[-1] for L in "ABCD"}

    def forward(self, idx, attention_mask=None, logits_to_keep=0):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            real = idx[b] if attention_mask is None else idx[b][attention_mask[b].bool()]
            L = self.letter or self.answer_of(self.tok.decode(real.tolist()))
            logits[b, -1, self.ids[L]] = 5.0
        return logits[:, -logits_to_keep:]  # Transformer's contract: 0 keeps every position


def test_oracle_scores_100_and_always_a_scores_the_share_of_a(letters_ckpt):
    d, hf, _ = letters_ckpt
    tok = Tokenizer.from_pretrained(d)
    answers = {s: {hand_example(r, answer=False): r[5] for r in rows_of("test", s)} for s in SUBJECTS}

    def answer_of(text):
        s = next(s for s in SUBJECTS if f"about  {s.replace('_', ' ')}.\n\n" in text)
        block = max((q for q in answers[s] if text.endswith(q)), key=len)  # the question asked last
        return answers[s][block]

    for shots in (0, 2):
        res = E.evaluate_mmlu(LetterModel(tok, hf.config.vocab_size, answer_of), tok, MMLU, shots=shots,
                              subjects=SUBJECTS, batch_size=16, progress=False)
        assert res["accuracy"] == 1.0 and res["macro"] == 1.0 and res["n"] == sum(len(rows_of("test", s)) for s in SUBJECTS)
        assert all(p["correct"] for p in res["predictions"]) and res["scores"] == "next-token logits"

    res = E.evaluate_mmlu(LetterModel(tok, hf.config.vocab_size, letter="A"), tok, MMLU, subjects=SUBJECTS,
                          batch_size=16, progress=False)
    share = {s: sum(r[5] == "A" for r in rows_of("test", s)) / len(rows_of("test", s)) for s in SUBJECTS}
    pooled = sum(r[5] == "A" for s in SUBJECTS for r in rows_of("test", s)) / sum(len(rows_of("test", s)) for s in SUBJECTS)
    assert {s: v["acc"] for s, v in res["subjects"].items()} == pytest.approx(share)
    assert res["accuracy"] == pytest.approx(pooled) and res["macro"] == pytest.approx(sum(share.values()) / len(share))
    assert res["accuracy"] != pytest.approx(res["macro"])  # micro and macro are different numbers
    other = ["anatomy", "virology"]  # both "other (business, health, misc.)" in hendrycks/test
    n_other = sum(len(rows_of("test", s)) for s in other)
    assert res["categories"]["other (business, health, misc.)"]["acc"] == pytest.approx(
        sum(share[s] * len(rows_of("test", s)) for s in other) / n_other)


class TieModel(nn.Module):
    """Logits at every position: 5 for the last token of each letter in `tied`, -50 for the other letters', 0
    elsewhere: the tied letters' scores are exactly equal and the highest (raw logits, or summed
    log-probabilities when they share the path " ")."""

    def __init__(self, tok, vocab, tied):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        last = {L: tok.encode(f"Answer: {L}")[-1] for L in "ABCD"}
        self.vocab, self.tied = vocab, [last[L] for L in tied]
        self.other = [last[L] for L in "ABCD" if L not in tied]

    def forward(self, idx, attention_mask=None, logits_to_keep=0):
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[:, :, self.tied] = 5.0
        logits[:, :, self.other] = -50.0
        return logits[:, -logits_to_keep:]


@pytest.mark.parametrize("tied,want", [("BD", "B"), ("CD", "C"), ("BCD", "B"), ("ABCD", "A"), ("", "A")])
def test_exact_ties_go_to_the_first_letter(letters_ckpt, split_ckpt, tied, want):
    """np.argmax's rule (the reference's): an exact tie goes to the first of the tied letters, for single-token
    letters (raw logits) and for letters split into " " + "B" (summed log-probabilities; there " A" is one
    token, so A cannot tie with the split B, C, D)."""
    for d, hf, _ in (letters_ckpt, split_ckpt):
        if d == split_ckpt[0] and "A" in (tied or "A"):
            continue
        tok = Tokenizer.from_pretrained(d)
        res = E.evaluate_mmlu(TieModel(tok, hf.config.vocab_size, tied), tok, MMLU, subjects=["abstract_algebra"],
                              limit=4, progress=False)
        assert [p["pred"] for p in res["predictions"]] == [want] * 4
        assert all(len({p["scores"]["ABCD".index(L)] for L in tied or "ABCD"}) == 1 for p in res["predictions"])


def test_context_rule_drops_shots_exactly_at_the_limit(letters_ckpt):
    d, hf, ref_tok = letters_ckpt
    tok = Tokenizer.from_pretrained(d)
    dev, row = rows_of("dev", "abstract_algebra"), rows_of("test", "abstract_algebra")[0]
    n = {k: len(ref_tok.encode(hand_prompt("abstract_algebra", dev[:k], row)).ids) for k in range(6)}  # BOS included
    model = LetterModel(tok, hf.config.vocab_size, letter="B")
    for max_len, k in [(n[5], 5), (n[5] - 1, 4), (n[4] - 1, 3), (n[1] - 1, 0), (n[0] - 1, 0)]:
        res = E.evaluate_mmlu(model, tok, MMLU, shots=5, max_len=max_len, subjects=["abstract_algebra"], limit=1,
                              progress=False)
        p = res["predictions"][0]
        assert (p["shots"], p["tokens"]) == (k, n[k]), max_len  # the question itself is never cut


def test_length_batches_cover_every_prompt_once_and_bound_padding():
    import random
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(20, 200), rng.randint(900, 1500)]) for _ in range(300)] + [1393, 5]
    batches = E.length_batches(lengths, 8, 4096)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[j] for j in b)
        assert lengths[b[0]] == longest and len(b) <= 8 and (len(b) == 1 or len(b) * longest <= 4096)
        assert all(2 * lengths[j] >= longest for j in b)  # nobody padded to more than twice their length


# -----------------------------------------------------------------------------
# against an independent transformers scorer on the same tiny checkpoint


@pytest.mark.parametrize("kind", ["letters", "split"])
def test_predictions_match_a_transformers_scorer(kind, request, tmp_path):
    d, hf, ref_tok = request.getfixturevalue(f"{kind}_ckpt")
    if kind == "letters":  # the protocol's path, with the 2048-token rule dropping shots on long passages
        subjects, shot_list = ["abstract_algebra", "high_school_european_history", "high_school_geography"], (0, 5)
    else:                  # letters split into " " + "B": continuation log-probabilities
        subjects, shot_list = ["abstract_algebra", "high_school_geography"], (0, 1)
    limit, max_len = 3, 2048
    for shots in shot_list:
        out = tmp_path / f"r{shots}.json"
        E.main(["--model", str(d), "--data", str(MMLU), "--subjects", ",".join(subjects), "--limit", str(limit),
                "--shots", str(shots), "--max_len", str(max_len), "--batch_size", "2", "--out", str(out)])
        res = json.loads(out.read_text())
        for s in subjects:
            ref = reference_scorer(hf, ref_tok, s, shots, max_len, limit)
            ours = [p for p in res["predictions"] if p["subject"] == s]
            assert [p["pred"] for p in ours] == [r["pred"] for r in ref]
            assert [p["shots"] for p in ours] == [r["shots"] for r in ref]
            torch.testing.assert_close(torch.tensor([p["scores"] for p in ours]),
                                       torch.tensor([r["scores"] for r in ref]), rtol=1e-4, atol=1e-4)
            assert res["subjects"][s]["acc"] == sum(r["correct"] for r in ref) / limit
        if shots == 5:  # the long-passage subject ran with fewer shots, the short one with all five
            by = {s: [p["shots"] for p in res["predictions"] if p["subject"] == s] for s in subjects}
            assert max(by["high_school_european_history"]) < 5 and min(by["abstract_algebra"]) == 5
            assert res["reduced_shots"] == sum(k < 5 for ks in by.values() for k in ks)
    assert res["scores"] == ("next-token logits" if kind == "letters" else "continuation log-probabilities")


def test_adapter_and_merged_checkpoint_score_like_the_adapted_model(letters_ckpt, tmp_path):
    import adapters
    d = letters_ckpt[0]
    model, tok = E.load_model(E.EvalConfig(model=str(d), dtype="fp32", device="cpu"))
    kw = dict(subjects=["abstract_algebra", "anatomy"], limit=6, progress=False)
    base = E.evaluate_mmlu(model, tok, MMLU, **kw)
    adapters.inject(model, adapters.AdapterConfig(adapter="lora", r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters.adapter_params(model).values():
            p.normal_(0, 0.3)  # B starts at zero: make the adapter change the model
    want = E.evaluate_mmlu(model, tok, MMLU, **kw)
    assert not torch.allclose(torch.tensor([p["scores"] for p in base["predictions"]]),
                              torch.tensor([p["scores"] for p in want["predictions"]]), atol=1e-3)
    adapters.save_adapter(model, tmp_path / "adapter")
    adapters.export_merged(model, tmp_path / "merged")
    for argv in (["--model", str(d), "--adapter", str(tmp_path / "adapter")],        # base + saved adapter
                 ["--model", str(tmp_path / "merged"), "--tokenizer", str(d)]):      # merged checkpoint
        E.main(argv + ["--data", str(MMLU), "--subjects", "abstract_algebra,anatomy", "--limit", "6",
                       "--out", str(tmp_path / "r.json")])
        got = json.loads((tmp_path / "r.json").read_text())
        assert [p["pred"] for p in got["predictions"]] == [p["pred"] for p in want["predictions"]]
        torch.testing.assert_close(torch.tensor([p["scores"] for p in got["predictions"]]),
                                   torch.tensor([p["scores"] for p in want["predictions"]]), rtol=1e-4, atol=1e-4)


def test_letter_form_is_the_one_inside_an_exemplar(letters_ckpt, split_ckpt):
    for d, _, ref_tok in (letters_ckpt, split_ckpt):
        tail, conts = E.letter_continuations(Tokenizer.from_pretrained(d))
        for L, c in zip("ABCD", conts):  # the tokens of " L" inside "...\nAnswer: L\n\n"
            ex = ref_tok.encode(f"x\nAnswer: {L}\n\nNext", add_special_tokens=False).ids
            pre = ref_tok.encode("x\nAnswer:", add_special_tokens=False).ids
            assert ex[len(pre):len(pre) + len(c)] == c and ref_tok.decode(c) == f" {L}"

    class Glued:  # a tokenizer that turns ": B" into one token cannot be scored by the next-token rule
        def encode(self, s):
            return [ord(ch) for ch in s.replace(": B", "\x01")]
    with pytest.raises(ValueError, match="merges 'Answer:' with the letter"):
        E.letter_continuations(Glued())


# -----------------------------------------------------------------------------
# GSM8K and BBH


def test_gsm8k_answer_extraction():
    cases = {"so she makes 9 * 2 = $18 every day.\n#### 18": "18", "#### 1,234": "1234", "#### -5": "-5",
             "The answer is $18.00.": "18", "It costs 0.50 dollars.": "0.5", "3 apples and 4 pears, 7 fruits": "7",
             "#### 12\n\n### Instruction:\n#### 99": "12", "no number here": None, "#### 3.": "3"}
    for text, want in cases.items():
        assert E.extract_gsm8k_answer(text) == want, text
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for r in rows:  # every gold answer is the text after "#### ", commas removed
        gold = r["answer"].split("#### ")[-1].strip().replace(",", "")
        assert E.extract_gsm8k_answer(r["answer"]) == gold and float(gold) == int(gold)


def test_bbh_normalisation():
    match = [("(B)", "(B)"), ("B", "(B)"), ("(b) 12/25/1937", "(B)"), ("So the answer is (C).", "(C)"),
             ("  True  ", "True"), ("false.", "False"), ("Yes", "Yes"), ("valid", "valid"),
             ("The answer is: 24", "24"), ("] ) }\nmore text", "] ) }"), ("apple  banana cherry", "apple banana cherry")]
    for pred, target in match:
        assert E.bbh_match(pred, target), (pred, target)
    miss = [("(A)", "(B)"), ("invalid", "valid"), ("Bob", "(B)"), ("24.5", "24"), ("", "(A)"), ("no", "Yes")]
    for pred, target in miss:
        assert not E.bbh_match(pred, target), (pred, target)


class ScriptedGenerator(nn.Module):
    """generate() appends a scripted answer to each (left-padded) prompt, then EOS, as model.generate does."""

    def __init__(self, tok, answer_of):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.tok, self.answer_of = tok, answer_of

    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, attention_mask=None):
        news = []
        for b in range(idx.size(0)):
            real = idx[b] if attention_mask is None else idx[b][attention_mask[b].bool()]
            news.append(self.tok.encode(self.answer_of(self.tok.decode(real.tolist())))[:max_new_tokens - 1])
        n = max(len(x) for x in news) + 1
        new = torch.tensor([x + [self.tok.eos_id] * (n - len(x)) for x in news])
        return torch.cat([idx, new], dim=1)


def test_gsm8k_and_bbh_score_scripted_generations(split_ckpt):
    tok = Tokenizer.from_pretrained(split_ckpt[0])
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()][:12]
    solution = {E.format_prompt(r["question"]): r["answer"] for r in rows}
    res = E.evaluate_gsm8k(ScriptedGenerator(tok, lambda p: solution[p[len("<|begin_of_text|>"):]]), tok,
                           SHARED / "gsm8k", limit=12, max_new_tokens=2000, batch_size=5, progress=False)
    assert res["accuracy"] == 1.0 and res["n"] == 12
    res = E.evaluate_gsm8k(ScriptedGenerator(tok, lambda p: "The answer is 3."), tok, SHARED / "gsm8k" / "test.jsonl",
                           limit=12, batch_size=5, progress=False)
    assert res["accuracy"] == sum(r["answer"].endswith("#### 3") for r in rows) / 12

    tasks = ["date_understanding", "navigate", "word_sorting"]
    exs = {t: json.loads((SHARED / "bbh" / f"{t}.json").read_text())["examples"][:10] for t in tasks}
    target = {E.format_prompt(e["input"]): e["target"] for t in tasks for e in exs[t]}
    res = E.evaluate_bbh(ScriptedGenerator(tok, lambda p: target[p[len("<|begin_of_text|>"):]] + "."), tok,
                         SHARED / "bbh", tasks=tasks, limit=10, max_new_tokens=500, batch_size=4, progress=False)
    assert res["accuracy"] == 1.0 and set(res["tasks"]) == set(tasks)
    res = E.evaluate_bbh(ScriptedGenerator(tok, lambda p: "(A)"), tok, SHARED / "bbh", tasks=tasks, limit=10,
                         progress=False)
    share = {t: sum(e["target"] == "(A)" for e in exs[t]) / 10 for t in tasks}
    assert {t: v["acc"] for t, v in res["tasks"].items()} == share
    assert res["accuracy"] == pytest.approx(sum(share.values()) / 3)  # unweighted mean over task files


def test_batched_generation_equals_one_at_a_time(split_ckpt):
    d, _, _ = split_ckpt
    model, tok = E.load_model(E.EvalConfig(model=str(d), dtype="fp32", device="cpu"))
    prompts = [E.format_prompt(q) for q in ["What is 2 + 2?", "Name a colour.", "A much longer question " * 5, "Hi"]]
    one = E.generate_texts(model, tok, prompts, 6, batch_size=1, progress=False)
    assert E.generate_texts(model, tok, prompts, 6, batch_size=4, progress=False) == one
    assert all(isinstance(t, str) for t in one)


# -----------------------------------------------------------------------------
# command line


def test_command_line_errors_are_one_line(tmp_path, split_ckpt, capsys):
    d = str(split_ckpt[0])
    (tmp_path / "only_test").mkdir()
    (tmp_path / "only_test" / "quiz_test.csv").write_text("q?,a,b,c,d,A\n")

    def err(argv):
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        assert e.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]
    assert "--task 'mmlu5'" in err(["--task", "mmlu5", "--model", d, "--data", str(MMLU)])
    assert "--data is required" in err(["--model", d])
    assert "not a directory" in err(["--model", str(tmp_path / "none"), "--data", str(MMLU)])
    assert "subject(s) astrology" in err(["--model", d, "--data", str(MMLU), "--subjects", "astrology"])
    assert "needs dev CSVs" in err(["--model", d, "--data", str(tmp_path / "only_test"), "--shots", "1"])
    assert "no test CSVs" in err(["--model", d, "--data", str(tmp_path)])
    assert "--shots must be >= 0, got -1" in err(["--model", d, "--data", str(MMLU), "--shots", "-1"])
    assert "--batch_size must be >= 1" in err(["--model", d, "--data", str(MMLU), "--batch_size", "0"])
    assert "--limit must be >= 0" in err(["--model", d, "--data", str(MMLU), "--limit", "-1"])
    assert "invalid int value" in err(["--model", d, "--data", str(MMLU), "--limit", "x"])
    if not torch.cuda.is_available():
        assert "no usable CUDA" in err(["--model", d, "--data", str(MMLU), "--device", "cuda"])
