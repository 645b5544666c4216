"""
bench/eval.py -- MMLU questions/s of eval_mmlu.py against the transformers scorer of conftest.py.

Side by side in one run, on the same random Llama-shaped checkpoint (written by transformers) and a
byte-level BPE tokenizer trained here on MMLU dev/val text (single-token " A".." D", like every real
tokenizer): eval_mmlu.evaluate_mmlu (batched, left padded, longest first) vs conftest.reference_scorer
(transformers, one question at a time: how hendrycks/test's evaluate_flan.py runs) vs a batched
transformers loop (left padding + attention mask + logits_to_keep=1, the fastest plain HF way).
Predictions must be identical. Uses transformers/tokenizers (test-only dependencies).

Run:  python -m bench eval [--shots 0] [--limit 40] [--hidden 256 --layers 4] [--device cpu]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import eval_mmlu as E
from conftest import LLAMA3_REGEX, LLAMA3_SPECIALS, hand_prompt, reference_scorer, rows_of
from model import Tokenizer, Transformer

SUBJECTS = ["abstract_algebra", "college_medicine", "high_school_geography", "moral_disputes", "world_religions"]


def train_tokenizer(d, data, vocab):
    """Byte-level BPE (Llama 3 split regex and specials) trained on MMLU dev prompts and val questions."""
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
    corpus = []
    for s, path in E.subject_files(data, "dev").items():
        rows = E.read_csv(path)
        corpus += [E.mmlu_prompt(s, rows, rows[0])]
    corpus += [" ".join(r[:5]) for p in E.subject_files(data, "val").values() for r in E.read_csv(p)]
    t = HFTok(models.BPE(ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens(LLAMA3_SPECIALS[:10])
    bos = LLAMA3_SPECIALS[0]
    t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    (d / "tokenizer.json").write_text(t.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": LLAMA3_SPECIALS[1]}))
    return t


@torch.no_grad()
def hf_batched(hf, ref_tok, prompts, batch_size, device):
    """Plain transformers, batched: left padding, attention mask, logits of the last position only."""
    letter_ids = [ref_tok.encode(f"Answer: {L}", add_special_tokens=False).ids[-1] for L in "ABCD"]
    seqs = [ref_tok.encode(p).ids for p in prompts]
    preds = [None] * len(seqs)
    for chunk in E.length_batches([len(s) for s in seqs], batch_size, batch_size * 1024):  # eval_mmlu's batching
        Tm = len(seqs[chunk[0]])
        idx = torch.zeros(len(chunk), Tm, dtype=torch.long)
        am = torch.zeros(len(chunk), Tm, dtype=torch.long)
        for i, j in enumerate(chunk):
            idx[i, Tm - len(seqs[j]):] = torch.tensor(seqs[j])
            am[i, Tm - len(seqs[j]):] = 1
        logits = hf(idx.to(device), attention_mask=am.to(device), logits_to_keep=1).logits[:, -1, letter_ids]
        for i, j in enumerate(chunk):
            preds[j] = "ABCD"[int(logits[i].float().argmax())]
    return preds


def main(argv=None):
    p = argparse.ArgumentParser(description="MMLU questions/s: eval_mmlu.py vs transformers")
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mmlu"))
    p.add_argument("--subjects", default=",".join(SUBJECTS))
    p.add_argument("--limit", type=int, default=40, help="questions per subject")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best of each is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)")
    args = p.parse_args(argv)
    import transformers
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    subjects = args.subjects.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ref_tok = train_tokenizer(d, args.data, args.vocab)
        cfg = transformers.LlamaConfig(vocab_size=ref_tok.get_vocab_size(), hidden_size=args.hidden,
                                       intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
                                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                       num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096,
                                       rope_theta=500000.0, bos_token_id=ref_tok.token_to_id(LLAMA3_SPECIALS[0]),
                                       eos_token_id=ref_tok.token_to_id(LLAMA3_SPECIALS[1]))
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        hf.save_pretrained(str(d))
        hf.to(args.device)
        model = Transformer.from_pretrained(d, dtype=dtype, device=args.device)
        tok = Tokenizer.from_pretrained(d)
        n_params = sum(p.numel() for p in model.parameters())

        res = E.evaluate_mmlu(model, tok, args.data, shots=args.shots, batch_size=args.batch_size,
                              subjects=subjects, limit=args.limit, progress=False)
        prompts, ks = [], [q["shots"] for q in res["predictions"]]
        for s in subjects:
            dev, test = rows_of("dev", s, args.data), rows_of("test", s, args.data)[:args.limit]
            prompts += [hand_prompt(s, dev[:ks[len(prompts)]], r) for r in test]  # the shots the rule chose
        scorers = {
            "eval_mmlu.py (batched, left-padded)": lambda: [q["pred"] for q in E.evaluate_mmlu(
                model, tok, args.data, shots=args.shots, batch_size=args.batch_size, subjects=subjects,
                limit=args.limit, progress=False)["predictions"]],
            "transformers, one question at a time (test_eval scorer)": lambda: [
                r["pred"] for s in subjects for r in reference_scorer(hf, ref_tok, s, args.shots, 2048, args.limit, args.data)],
            f"transformers, batched {args.batch_size} + logits_to_keep=1": lambda: hf_batched(
                hf, ref_tok, prompts, args.batch_size, args.device),
        }
        best, cpu, preds = {k: float("inf") for k in scorers}, {k: float("inf") for k in scorers}, {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: the machine may be shared
            for name, fn in scorers.items():
                t0, c0 = time.perf_counter(), time.process_time()
                preds[name] = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        rows = [(name, best[name], cpu[name], preds[name]) for name in scorers]

    n = len(res["predictions"])
    tokens = sum(q["tokens"] for q in res["predictions"])
    ours = rows[0][1]
    print(f"MMLU {args.shots}-shot, {n} questions ({len(subjects)} subjects x {args.limit}), {tokens} prompt tokens; "
          f"random Llama {n_params / 1e6:.1f}M params (d={args.hidden}, L={args.layers}, V={cfg.vocab_size}), "
          f"{args.dtype}, {args.device}, torch {torch.__version__} threads {torch.get_num_threads()}, "
          f"best of {args.rounds} interleaved rounds\n")
    print("| scorer | wall s | CPU s | questions/s (wall) | eval_mmlu speed-up (wall / CPU) | predictions identical to eval_mmlu |")
    print("|---|---:|---:|---:|---:|---|")
    for name, sec, cpu_s, preds in rows:
        same = sum(a == b for a, b in zip(preds, rows[0][3]))
        print(f"| {name} | {sec:.2f} | {cpu_s:.2f} | {n / sec:.1f} | {sec / ours:.2f}x / {cpu_s / rows[0][2]:.2f}x | "
              f"{'yes' if same == n else 'NO'} ({same}/{n}) |")
    return rows


if __name__ == "__main__":
    main()
