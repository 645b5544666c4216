"""
bench.py -- every speed and memory measurement of nanoMASA, side by side with its reference in one run.

Tests never time anything; the numbers live here and in BENCHMARKS.md (command, machine, ratios). Each
benchmark is one file beside this one, runnable on its own; this is the index:

    python bench.py model      # load time, peak memory while loading, forward tokens/s vs transformers (issue 2)
    python bench.py adapters   # one training step per adapter vs LoRA; our LoRA vs transformers+peft (issue 3)
    python bench.py kernels    # MoSA weight-gradient reduction: index_add / permutation vs autograd (issue 4)
    python bench.py train      # train.py tokens/s and peak memory vs a transformers+peft loop (issue 5)
    python bench.py eval       # MMLU questions/s vs a transformers scorer, identical predictions (issue 6)
    python bench.py fsdp       # train.py --fsdp vs DDP over 2 processes: base memory, peak RSS, step time (issue 18)
    python bench.py fingerprint  # content fingerprints: a 16 GiB checkpoint's, cold and warm; data's per GiB (issue 17)
    python bench.py tokenizer  # preparing 15k examples: tokenizer.py vs tokenizers / transformers (issue 16)

Arguments after the name go to that benchmark (`python bench.py adapters --variants lora,rasa,mosa`).
The comparisons need the test requirements (transformers, peft): `bash run.sh test` installs them.
CPU numbers in BENCHMARKS.md use fp32 (these CPUs have no native bf16) and mostly one thread.
"""
import importlib
import sys

BENCHMARKS = {"model": "bench_model", "adapters": "bench_adapters", "kernels": "bench_kernels",
              "train": "bench_train", "eval": "bench_eval", "fingerprint": "bench_fingerprint",
              "fsdp": "bench_fsdp", "tokenizer": "bench_tokenizer"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python bench.py {{{','.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])
