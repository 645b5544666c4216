"""Tests for tokenizer.py: every Llama-family tokenizer family, built offline with the reference libraries
(the `tokenizers` BPE trainer, `sentencepiece` converted by transformers), read by model.Tokenizer and
compared with transformers.AutoTokenizer on the same folder over thousands of real strings (MMLU, GSM8K,
BBH from ../shared/data, this repository's code, and hand-made unicode / whitespace / digit / special-token
cases): equal ids, equal decodes, equal BOS/EOS framing.
"""
import csv
import functools
import io
import json
import random
from pathlib import Path

import pytest

from model import LoadError, Tokenizer

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
SPECIAL_TEXTS = [  # what real text rarely holds: whitespace runs, digits, unicode, emoji, special-token text
    "", " ", "  hi", "a  \n\n  b\t\t x   ", "  leading and trailing  ", "\n\n\n", "x\r\ny", "1234567 + 89 = 1234656",
    "½ ² ٣٤ ⅷ 3.14159 1,000,000", "🙂🚀 emoji 👩‍👩‍👧 日本語のテキスト 中文 한국어 العربية", "cafe\u0301 vs café, naïve Ünïcödé",
    "\x04\x06 ctrl\x13chars\x16\x1d y", "rare planes \U00040000\U00080000 end", "don't STOP, WE'LL see; it's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<s>[INST] hi [/INST]</s><s> again",
    "<unk> and <s> inside", "tab\tafter<|im_end|>  two spaces", "▁already▁metaspace ▁ x", "<0x41> literal",
]


@functools.lru_cache(maxsize=None)
def text_pools():
    """What real_texts samples from, read once per test session: MMLU test rows, GSM8K test problems, BBH
    examples, and the paragraphs of this repository's model.py and tokenizer.py (code)."""
    mmlu = [r for f in sorted((DATA / "mmlu" / "test").glob("*.csv")) for r in csv.reader(f.open(encoding="utf-8"))]
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    bbh = [e for f in sorted((DATA / "bbh").glob("*.json")) for e in json.loads(f.read_text())["examples"]]
    here = Path(__file__).resolve().parent
    code = [p for f in ("model.py", "tokenizer.py") for p in (here / f).read_text().split("\n\n") if p.strip()]
    return mmlu, gsm, bbh, code


def real_texts(n_each=700, seed=0):
    """n_each MMLU test rows, GSM8K test problems (question + worked answer) and BBH examples, chosen at
    random; the paragraphs of this repository's model.py and tokenizer.py (code); SPECIAL_TEXTS."""
    rng = random.Random(seed)
    mmlu, gsm, bbh, code = text_pools()
    return ([" ".join(r[:5]) + "\nAnswer: " + r[5] for r in rng.sample(mmlu, n_each)]
            + [g["question"] + "\n" + g["answer"] for g in rng.sample(gsm, n_each)]
            + [e["input"] + "\n" + e["target"] for e in rng.sample(bbh, n_each)] + code + SPECIAL_TEXTS)


def assert_reads_like_transformers(d, texts):
    """model.Tokenizer on folder d gives AutoTokenizer's ids (with and without its special tokens), decodes
    and bos/eos ids."""
    from transformers import AutoTokenizer
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer.from_pretrained(d)
    bad = [t for t in texts if tok.encode(t) != hf.encode(t, add_special_tokens=False)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"
    framed = [hf.encode(t) for t in texts]
    bad = [t for t, ids in zip(texts, framed) if tok.encode(t, bos=True) != ids]
    assert not bad, f"{len(bad)} of {len(texts)} framed differently, first: {bad[0]!r}"
    for t, ids in zip(texts, framed):
        assert tok.decode(ids) == hf.decode(ids), t
    rng = random.Random(0)  # arbitrary id runs too: split UTF-8, lone <0xNN> bytes, specials mid-text
    for ids in ([rng.randrange(len(hf)) for _ in range(rng.randint(1, 12))] for _ in range(500)):
        assert tok.decode(ids) == hf.decode(ids), ids
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tok.n_vocab == len(hf)
    return tok, hf

# -----------------------------------------------------------------------------
# byte-level BPE (GPT-2 byte map), trained by the `tokenizers` BPE trainer


def train_byte_level(d, digits, all_bytes, tokenizer_class="PreTrainedTokenizerFast", bos_template=True):
    """A byte-level BPE trained on real text, ChatML specials, SmolLM2's layout: Sequence[Digits, ByteLevel]
    if digits, and without the initial 256-byte alphabet unless all_bytes (the vocabulary then lacks every
    byte the corpus never holds)."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
    t = HFTok(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) if digits else bl
    t.decoder = decoders.ByteLevel()
    alphabet = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if all_bytes else {}
    t.train_from_iterator(real_texts(300, seed=1), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False, **alphabet))
    if bos_template:
        t.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return t


@pytest.mark.parametrize("digits,all_bytes", [(True, True), (False, False), (True, False)])
def test_byte_level_bpe_matches_transformers(tmp_path, digits, all_bytes):
    ref = train_byte_level(tmp_path, digits, all_bytes)
    n_bytes = sum(1 for s in ref.get_vocab(with_added_tokens=False) if len(s) == 1)
    assert (n_bytes == 256) == all_bytes  # the vocabularies under test do lack bytes
    tok, _ = assert_reads_like_transformers(tmp_path, real_texts())
    assert tok.prefix == [1] and tok.suffix == []


def test_letters_with_missing_bytes_match_transformers(tmp_path):
    """tokenizers' BPE skips a byte it has no token for and merges across the gap: inside a word
    (" th" + letter + "e", one pre-token), the bytes on both sides of a dropped byte may join."""
    import unicodedata
    from transformers import AutoTokenizer
    ref = train_byte_level(tmp_path, digits=False, all_bytes=False)
    tok, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    byte_of = {c: b for b, c in __import__("conftest").bytes_to_unicode().items()}
    present = {byte_of[s] for s in ref.get_vocab(with_added_tokens=False) if len(s) == 1}
    letters = [chr(c) for c in range(0xA0, 0x30000, 7) if unicodedata.category(chr(c)).startswith("L")]
    words = [" th" + c + "e" for c in letters if any(b not in present for b in c.encode())]
    assert len(words) > 1000
    assert [tok.encode(w) for w in words] == [hf.encode(w, add_special_tokens=False) for w in words]


def test_ids_out_of_merge_order_fall_back_to_merging_by_rank(tmp_path):
    """tiktoken merges by token id; a vocabulary numbered out of merge order (two merged tokens swap ids)
    must merge by merge rank instead, as tokenizers does."""
    train_byte_level(tmp_path, digits=False, all_bytes=True)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    first, last = ["".join(m) for m in (merges[0], merges[-1])]
    vocab[first], vocab[last] = vocab[last], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    assert not Tokenizer.from_pretrained(tmp_path).tiktoken_ok
    assert_reads_like_transformers(tmp_path, real_texts(100))


def test_gpt2_tokenizer_class_is_rebuilt_as_transformers_does(tmp_path):
    """tokenizer_class GPT2Tokenizer: transformers 5 rebuilds ByteLevel from the vocabulary and drops the
    file's Digits step; so must we (the file read as written tokenizes "a  1" differently)."""
    train_byte_level(tmp_path, digits=True, all_bytes=False, tokenizer_class="GPT2Tokenizer", bos_template=False)
    tok, _ = assert_reads_like_transformers(tmp_path, real_texts(300))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    as_written = Tokenizer.from_pretrained(tmp_path)
    assert tok.prefix == [] and tok.encode("a  1") != as_written.encode("a  1")

# -----------------------------------------------------------------------------
# SentencePiece-style BPE (Llama 2, Mistral, TinyLlama): trained by sentencepiece, converted by transformers


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A SentencePiece BPE (byte fallback, split digits, as Llama 2's) trained on real text and turned into a
    tokenizer.json + tokenizer_config.json by transformers' LlamaTokenizer, as a Hub Llama 2 folder ships."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(real_texts(300, seed=1)), model_writer=m, vocab_size=800,
                                   model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.9995,
                                   minloglevel=2)
    d = tmp_path_factory.mktemp("spm")
    (d / "sp").mkdir()
    (d / "sp" / "tokenizer.model").write_bytes(m.getvalue())
    LlamaTokenizer.from_pretrained(str(d / "sp")).save_pretrained(str(d / "llama"))
    return d / "llama"


def llama2_folder(src, dst, config=None, tokenizer_json=None):
    """Copy of the converted folder, with Llama 2's post-processor ("<s> $A") and edits to both files."""
    import shutil
    shutil.copytree(src, dst)
    tj, tc = json.loads((dst / "tokenizer.json").read_text()), json.loads((dst / "tokenizer_config.json").read_text())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    tj.update(tokenizer_json or {})
    tc.update(config or {})
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


LLAMA_VARIANTS = {
    # Llama 2 / TinyLlama Hub configs: LlamaTokenizer, legacy false ('▁' before the first piece only)
    "llama2": dict(config={"legacy": False, "add_bos_token": True, "add_eos_token": False}),
    # Mistral v0.1 config: legacy true ('▁' before every piece between special tokens)
    "mistral": dict(config={"legacy": True, "add_bos_token": True}),
    # the older tokenizer.json form, read as written (PreTrainedTokenizerFast): Prepend + Replace normalizers
    "normalizers": dict(config={"tokenizer_class": "PreTrainedTokenizerFast"}, tokenizer_json={
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {
            "type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}, "pre_tokenizer": None}),
    # a Metaspace pre-tokenizer that splits words, with the Metaspace decoder
    "metaspace_split": dict(config={"tokenizer_class": "PreTrainedTokenizerFast"}, tokenizer_json={
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Metaspace", "replacement": "▁",
                                                                               "prepend_scheme": "always", "split": True}]}}),
}


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_sentencepiece_style_bpe_matches_transformers(sentencepiece_folder, tmp_path, variant):
    d = llama2_folder(sentencepiece_folder, tmp_path / variant, **LLAMA_VARIANTS[variant])
    tok, hf = assert_reads_like_transformers(d, real_texts())
    assert tok.prefix == [1] and tok.bos_id == 1 and tok.eos_id == 2
    assert any(t.startswith("<0x") for t in hf.convert_ids_to_tokens(hf.encode("日本語 🙂")))  # byte fallback used


def test_add_eos_token_frames_as_transformers_saves_it(sentencepiece_folder, tmp_path):
    """LlamaTokenizer(add_eos_token=True) saves "$A </s>" into the post-processor: EOS after every text."""
    from transformers import LlamaTokenizer
    LlamaTokenizer.from_pretrained(str(sentencepiece_folder), add_eos_token=True).save_pretrained(str(tmp_path))
    tok, _ = assert_reads_like_transformers(tmp_path, real_texts(100))
    assert tok.suffix == [2] and tok.encode("hi", bos=True)[-1] == 2


def test_transformers_ignores_add_bos_token_beside_a_tokenizer_json(sentencepiece_folder, tmp_path):
    """transformers' fresh conversion writes no BOS into the post-processor; add_bos_token in the config does
    not bring it back (transformers 5 drops the flag when tokenizer.json exists), and we agree."""
    import shutil
    shutil.copytree(sentencepiece_folder, tmp_path / "d")
    tc = json.loads((tmp_path / "d" / "tokenizer_config.json").read_text())
    (tmp_path / "d" / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": True}))
    tok, _ = assert_reads_like_transformers(tmp_path / "d", real_texts(50))
    assert tok.prefix == []

# -----------------------------------------------------------------------------
# what is refused: one line naming the piece


def _bert_like(d, **parts):
    from tokenizers import Tokenizer as HFTok, models, trainers
    t = HFTok(models.BPE())
    t.train_from_iterator(real_texts(20), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tj = json.loads(t.to_str())
    tj.update(parts)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("part,value,named", [
    ("normalizer", {"type": "Lowercase"}, "unsupported normalizer"),
    ("pre_tokenizer", {"type": "BertPreTokenizer"}, "unsupported pre_tokenizer"),
    ("decoder", {"type": "WordPiece", "prefix": "##", "cleanup": True}, "unsupported decoder"),
    ("post_processor", {"type": "BertProcessing", "sep": ["[SEP]", 1], "cls": ["[CLS]", 0]}, "unsupported post_processor"),
    ("model", {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}, "unsupported model"),
])
def test_unsupported_tokenizer_piece_is_refused_in_one_line(tmp_path, part, value, named):
    _bert_like(tmp_path, **{part: value})
    with pytest.raises(LoadError, match=named) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and value["type"] in str(e.value)
