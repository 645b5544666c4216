"""Shared test fixtures: tiny random checkpoints written by `transformers` itself (the reference), and tiny
tokenizers trained by the `tokenizers` library, so every loader test reads files in exactly the format the
Hub serves. Tests never download anything.

    make_hf_checkpoint(path, arch, dtype, seed, max_shard_size, tokenizer=None, **overrides) -> HF model
    write_tokenizer(dir, kind="json"|"tiktoken"|"qwen2") -> the trained `tokenizers.Tokenizer` (reference)
    fixture hf_checkpoint: make(arch="llama3", tokenizer=None, **kw) -> (dir, hf_model)
    ARCHS, TINY, LLAMA3_REGEX, QWEN2_REGEX, LLAMA3_SPECIALS, TOKENIZER_KINDS, CORPUS: the settings behind them
    rows_of, hand_prompt, reference_scorer(hf, ref_tok, subject, k, max_len, limit, mmlu): MMLU by hand
"""
import base64
import functools
import csv
import json
from pathlib import Path

import pytest
import torch

# Tiny shapes that still exercise GQA (4 query heads, 2 kv heads) and an odd vocabulary.
TINY = dict(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6)),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_theta=10000.0)),
}


def make_hf_checkpoint(path, arch="llama3", dtype=torch.float32, seed=0, max_shard_size=None, tokenizer=None,
                       **overrides):
    """Write a random tiny HF checkpoint of `arch` to `path` with transformers; return the HF model (eval).
    tokenizer="json"|"tiktoken"|"qwen2" also writes that tokenizer beside it (write_tokenizer) and, unless
    overridden, sizes the vocabulary to it and takes bos/eos ids from it."""
    import transformers
    cfg_name, model_name, extra = ARCHS[arch]
    if tokenizer is not None:
        tok = write_tokenizer(path, tokenizer)
        names = TOKENIZER_KINDS[tokenizer]
        extra = {**extra, "vocab_size": tok.get_vocab_size(),
                 "bos_token_id": tok.token_to_id(names["bos"]) if names["bos"] else None,
                 "eos_token_id": tok.token_to_id(names["eos"])}
    kw = {**TINY, **extra, **overrides}
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype).eval()
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **save_kw)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory fixture: hf_checkpoint(arch, tokenizer=None, **overrides) -> (dir, hf_model)."""
    def make(arch="llama3", **kw):
        d = tmp_path / f"ckpt_{arch}"
        return d, make_hf_checkpoint(d, arch, **kw)
    return make

# -----------------------------------------------------------------------------
# tokenizers: a tiny byte-level BPE trained on a few lines, in the layouts Llama 3 and Qwen2 ship


LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Meta's Llama 3 reference special tokens: 256 of them, numbered right after the base vocabulary.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   ] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
TOKENIZER_KINDS = {
    "json": dict(regex=LLAMA3_REGEX, specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "tiktoken": dict(regex=LLAMA3_REGEX, specials=LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>"),
    "qwen2": dict(regex=QWEN2_REGEX, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                  eos="<|endoftext|>"),
}
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "The quick brown fox jumps over the lazy dog. The dog didn't care; it's been there, they'll say.",
    "Question: What is 12 + 30? Answer: 42. Question: what is 1999 * 2? Answer: 3998.",
    "def forward(self, x):\n    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))\n\n",
    "Low-rank adaptation freezes the pretrained weights W0 and trains A and B, with r much smaller than d.",
    "Café, naïve, résumé, Ünïcödé; 日本語のテキスト, 中文文本, emoji 🙂🚀 and tabs\tand   spaces.",
] * 20


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (written out here again, independently of model.py)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in bs]
    return {**dict(zip(bs, map(chr, bs))), **{b: chr(256 + n) for n, b in enumerate(extra)}}


@functools.lru_cache(maxsize=None)
def _trained(kind):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    spec = TOKENIZER_KINDS[kind]
    tok = Tokenizer(models.BPE(ignore_merges=kind != "qwen2"))  # Llama 3 ships ignore_merges=true, Qwen2 not
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(spec["specials"])  # numbered after the base vocabulary, in order
    if spec["bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def write_tokenizer(d, kind="json"):
    """Write a tiny trained tokenizer into folder d and return it as a `tokenizers.Tokenizer` (the reference).
    kind "json": Llama-3-style tokenizer.json (+ tokenizer_config.json naming bos/eos), with Meta's 256
    special tokens; "tiktoken": the same vocabulary as Meta's base64 `tokenizer.model` rank file alone
    (as in Llama 3's original/ folder); "qwen2": Qwen2-style tokenizer.json (NFC, no BOS, <|im_end|>)."""
    from tokenizers import Tokenizer
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(_trained(kind))
    spec = TOKENIZER_KINDS[kind]
    if kind == "tiktoken":
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        vocab = sorted(tok.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        lines = [base64.b64encode(bytes(byte_of[c] for c in s)).decode() + f" {i}" for s, i in vocab]
        (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    else:
        (d / "tokenizer.json").write_text(tok.to_str())
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"], "eos_token": spec["eos"],
            "clean_up_tokenization_spaces": False, "model_max_length": 131072}))
    return tok

# -----------------------------------------------------------------------------
# MMLU by hand: the prompt written out and hendrycks/test's scorer run through transformers, the references
# test_eval.py checks eval_mmlu.py against (bench/eval.py times the scorer too)

MMLU = Path(__file__).parent.parent / "shared" / "data" / "mmlu"


def rows_of(split, subject, mmlu=MMLU):  # the csv module, read here independently of eval_mmlu.read_csv
    with open(Path(mmlu) / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def hand_example(r, answer=True):
    text = f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
    return text + (f" {r[5]}\n\n" if answer else "")


def hand_prompt(subject, dev, row):
    # the reference header has TWO spaces before the subject (" abstract algebra" after "about ")
    header = "The following are multiple choice questions (with answers) about  " + subject.replace("_", " ") + ".\n\n"
    return header + "".join(hand_example(d) for d in dev) + hand_example(row, answer=False)


def reference_scorer(hf, ref_tok, subject, k, max_len, limit, mmlu=MMLU):
    """hendrycks/test's loop, for a decoder-only HF model, one question at a time: drop shots until the
    prompt fits, score each letter's continuation after "Answer:" (log-probability summed over its
    tokens, lm-eval style; the raw next-token logit when every letter is one token)."""
    base = ref_tok.encode("Answer:", add_special_tokens=False).ids
    conts = [ref_tok.encode(f"Answer: {L}", add_special_tokens=False).ids[len(base):] for L in "ABCD"]
    single = all(len(c) == 1 for c in conts)
    extra = max(len(c) for c in conts) - 1
    dev, out = rows_of("dev", subject, mmlu), []
    for row in rows_of("test", subject, mmlu)[:limit]:
        kk = k
        while True:
            ctx = ref_tok.encode(hand_prompt(subject, dev[:kk], row)).ids  # the post-processor adds BOS
            if len(ctx) + extra <= max_len or kk == 0:
                break
            kk -= 1
        logits = {}  # one forward per distinct prefix of the letters' continuations
        for c in conts:
            if tuple(c[:-1]) not in logits:
                with torch.no_grad():
                    logits[tuple(c[:-1])] = hf(torch.tensor([ctx + c[:-1]])).logits[0].float()
        scores = []
        for c in conts:
            lg = logits[tuple(c[:-1])]
            if single:
                scores.append(lg[-1, c[0]].item())
            else:
                logp = torch.log_softmax(lg, -1)
                scores.append(sum(logp[len(ctx) - 1 + t, tid].item() for t, tid in enumerate(c)))
        pred = "ABCD"[max(range(4), key=lambda i: (scores[i], -i))]
        out.append({"pred": pred, "shots": kk, "scores": scores, "correct": pred == row[5]})
    return out


# -----------------------------------------------------------------------------
# the reference versions: requirements-test.txt pins them; CI prints what it ran against


def pinned_references(path="requirements-test.txt"):
    """{distribution: version} for every `name==version` line of requirements-test.txt and the files it
    includes with -r (requirements.txt pins torch)."""
    pins = {}
    for line in (Path(__file__).parent / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins.update(pinned_references(line[3:].strip()))
        elif "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def installed_version(name):
    import importlib.metadata
    try:  # without the local build tag: torch 2.13.0+cpu and 2.13.0+cu128 are both 2.13.0
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_report_header(config):
    pins = {**pinned_references(), **pinned_references("requirements-test-nodeps.txt")}
    return "references: " + ", ".join(f"{n} {installed_version(n)}" for n in pins)
