"""
bench/tokenizer.py -- tokenizer.py's speed against the `tokenizers` library (Rust) and transformers, on
preparing a Dolly-sized instruction set: 15,000 examples (prepare_data.tokenize_example: prompt template,
[BOS] + prompt + response + [EOS]), built from GSM8K's training problems (../shared/data; Dolly itself is not
available offline). Goal: under two minutes for the whole set on this CPU, for every tokenizer family.
Times are CPU seconds of this process (time.process_time: the machine is shared; each candidate runs on
one thread).

Families (each trained here offline, as the tests build them):
  sentencepiece  Llama-2-style BPE, byte fallback, 8,000 pieces (sentencepiece, converted by transformers):
                 tokenizer.py's plain-Python BPE
  byte-level     byte-level BPE with Digits, lacking some bytes, 8,000 tokens (tokenizers trainer): tiktoken

    python -m bench tokenizer [--n 15000 --vocab 8000]
"""
import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def records(n):
    g = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    ans = lambda a: a.replace("<<", "").replace(">>", "")
    return [dict(instruction=g[i % len(g)]["question"], input="" if i < len(g) else "Show your work.",
                 output=ans(g[i % len(g)]["answer"])) for i in range(n)]


def sentencepiece_folder(d, texts, vocab):
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=m, vocab_size=vocab, model_type="bpe",
                                   byte_fallback=True, split_digits=True, minloglevel=2)
    (d / "sp").mkdir(parents=True)
    (d / "sp" / "tokenizer.model").write_bytes(m.getvalue())
    LlamaTokenizer.from_pretrained(str(d / "sp")).save_pretrained(str(d / "tok"))
    return d / "tok"


def byte_level_folder(d, texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                       "<|im_end|>"], show_progress=False))
    (d / "tok").mkdir(parents=True)
    t.save(str(d / "tok" / "tokenizer.json"))
    (d / "tok" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return d / "tok"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--n", type=int, default=15000)
    p.add_argument("--vocab", type=int, default=8000)
    a = p.parse_args(argv)
    from prepare_data import format_prompt, tokenize_example
    from model import Tokenizer
    from tokenizers import Tokenizer as RustTok
    from transformers import AutoTokenizer
    recs = records(a.n)
    texts = [r["instruction"] + "\n" + r["output"] for r in recs[:4000]]
    print(f"{a.n} examples, {sum(len(r['instruction']) + len(r['output']) for r in recs) / 1e6:.1f} M characters")
    for fam, build in (("sentencepiece", sentencepiece_folder), ("byte-level", byte_level_folder)):
        with tempfile.TemporaryDirectory() as tmp:
            d = build(Path(tmp), texts, a.vocab)
            t0 = time.process_time()
            tok = Tokenizer.from_pretrained(d)
            t_load = time.process_time() - t0
            t0 = time.process_time()
            ours = [tokenize_example(tok, r, 1024)[0] for r in recs]
            t_ours = time.process_time() - t0
            rust, hf = RustTok.from_file(str(d / "tokenizer.json")), AutoTokenizer.from_pretrained(str(d))
            t0 = time.process_time()
            for r in recs:
                rust.encode(format_prompt(r["instruction"], r["input"])), rust.encode(r["output"], add_special_tokens=False)
            t_rust = time.process_time() - t0
            t0 = time.process_time()
            ref = [hf.encode(format_prompt(r["instruction"], r["input"])) + hf.encode(r["output"], add_special_tokens=False)
                   + [hf.eos_token_id] for r in recs]
            t_hf = time.process_time() - t0
            same = sum(x[:1024] == y[:1024] for x, y in zip(ours, ref))
            print(f"{fam:14s} load {t_load:5.2f} s | prepare {a.n}: ours {t_ours:6.1f} s, tokenizers (Rust, one "
                  f"thread) {t_rust:5.1f} s ({t_ours / t_rust:.1f}x), transformers {t_hf:5.1f} s | "
                  f"{same}/{a.n} identical to transformers' ids", flush=True)


if __name__ == "__main__":
    sys.exit(main())
