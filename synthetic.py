"""
synthetic.py -- the offline demo's made-up world (issue 7): its tasks, their held-out split, the text and
quizzes its base model is pretrained on, and its tokenizer.

    SYNTHETIC_TASKS     seeded generators of problems with an answer and three distractors, correct by
                        construction (a number's parity, multiples of 5, a word's letters, a made-up land's
                        customs, sums, maxima, reversals, a made-up world's facts, a threshold);
                        split_pool holds out dev + test problems, synthetic_heldout returns them as MMLU CSV rows
    synthetic_pretrain_texts   plain sentences (every 2-digit sum, maxima, reversals, the world's facts,
                        selection and lookup lines); never a held-out problem, the multiple-choice format,
                        nor what the default tasks ask (the demo base's first pretraining stage)
    quiz_item           generic multiple-choice quizzes that ask nothing the tasks ask (its second stage)
    write_bpe_tokenizer a pure-Python byte-level BPE (Sennrich et al., 2016; GPT-2's byte map) written as
                        a Hugging Face tokenizer.json

Everything is deterministic from the seed. prepare_data.py turns this world into records and files (its
recipes synthetic and synthetic_quiz render them with the MMLU prompt; synthetic_pretrain keeps the plain text); demo.py runs
those recipes. Run:
    python prepare_data.py synthetic --model DIR --out data/synthetic --seed 0
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
# multiple-choice questions within minutes (measured: docs/demo.md, "How the tasks were chosen").

SYNTHETIC_TASKS = ("parity", "multiple", "letter", "vowel", "zorbia", "threshold", "addition", "maximum", "reverse",
                   "world")
SYNTHETIC_DEFAULT = ("parity", "multiple", "letter", "vowel", "zorbia")  # the default of prepare_data --syn_tasks
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


def mc_rows(rng, problems):
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


def split_pool(seed, task, n_train, n_test):
    """-> (dev, test, train) problems. A finite pool (the world's facts) holds out at most half."""
    pool = synthetic_problems(seed, task, N_DEV + n_test + n_train)
    n_test = min(n_test, len(pool) // 2 - N_DEV)
    return pool[:N_DEV], pool[N_DEV:N_DEV + n_test], pool[N_DEV + n_test:]


def synthetic_tasks(tasks=SYNTHETIC_DEFAULT, flag="--syn_tasks"):
    """-> tuple of task names from a tuple or a comma-separated string; ValueError (naming `flag`) on an
    unknown name."""
    tasks = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    if not tasks or (bad := [t for t in tasks if t not in SYNTHETIC_GENERATORS]):
        raise ValueError(f"unknown synthetic task {bad[0] if tasks else ''!r} in {flag}: choose among "
                        f"{', '.join(SYNTHETIC_TASKS)} (comma-separated)")
    if len(set(tasks)) < len(tasks):
        raise ValueError(f"{flag} names a task twice ({','.join(tasks)}): name each task once")
    return tasks


def synthetic_heldout(seed: int = 0, n_train: int = 1000, n_test: int = 100, tasks=SYNTHETIC_DEFAULT):
    """Held-out MC items: {"dev": {task: [rows]}, "test": {task: [rows]}}, rows in MMLU CSV column order."""
    out = {"dev": {}, "test": {}}
    for task in synthetic_tasks(tasks):
        rng = random.Random(f"nanomasa-mc-{seed}-{task}")
        dev, test, _ = split_pool(seed, task, n_train, n_test)
        out["dev"][task] = mc_rows(rng, dev)
        out["test"][task] = mc_rows(rng, test)
    return out


# -----------------------------------------------------------------------------
# synthetic_pretrain_texts: what the offline demo's base model is pretrained on (demo.py). Plain sentences
# with the skills of the non-default tasks (sums, maxima, reversals, the world's facts); it never shows
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
        dev, test, _ = split_pool(seed, task, n_train, n_test)
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
# the answer-letter format but stays at chance on the tasks (measured: docs/demo.md, "How the tasks were chosen").

QUIZ_CATEGORIES = {"color": "red blue green yellow black white pink brown gray purple".split(),
                   "animal": "dog cat horse cow sheep goat pig duck mouse lion".split(),
                   "fruit": "apple pear plum grape lemon mango peach cherry melon banana".split(),
                   "tool": "hammer saw drill knife spoon fork brush rope nail shovel".split()}


def quiz_item(rng, letters="abcdefghiklmnoprstuvz"):
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


# -----------------------------------------------------------------------------
# write_bpe_tokenizer: the demo base's tokenizer, trained on its pretraining text

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
    from model import write_atomic
    from tokenizer import bytes_to_unicode
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
    write_atomic(out / "tokenizer.json", lambda tmp: tmp.write_bytes(json.dumps(tj, ensure_ascii=False).encode()))
    tc = {"bos_token": DEMO_SPECIALS[0], "eos_token": DEMO_SPECIALS[1], "model_max_length": 512,
          "tokenizer_class": "PreTrainedTokenizerFast"}
    write_atomic(out / "tokenizer_config.json", lambda tmp: tmp.write_bytes(json.dumps(tc, indent=2).encode()))
    return n + len(DEMO_SPECIALS)
