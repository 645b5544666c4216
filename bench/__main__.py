"""
python -m bench NAME -- every speed and memory measurement of nanoMASA, side by side with its reference in one run.

Tests never time anything; the numbers live here and in bench/BENCHMARKS.md (command, machine, ratios). Each
benchmark is one module of this package, also runnable on its own (`python -m bench.NAME`); this is the index.
Run from the repository root (the benchmarks import model.py, train.py, ... from there):

    python -m bench model      # load time, peak memory while loading, forward tokens/s vs transformers (issue 2)
    python -m bench adapters   # one training step per adapter vs LoRA; our LoRA vs transformers+peft (issue 3)
    python -m bench kernels    # MoSA weight-gradient reduction: index_add / permutation vs autograd (issue 4)
    python -m bench train      # train.py tokens/s and peak memory vs a transformers+peft loop (issue 5)
    python -m bench eval       # MMLU questions/s vs a transformers scorer, identical predictions (issue 6)
    python -m bench fsdp       # train.py --fsdp vs DDP over 2 processes: base memory, peak RSS, step time (issue 18)
    python -m bench fingerprint  # content fingerprints: a 16 GiB checkpoint's, cold and warm; data's per GiB (issue 17)
    python -m bench tokenizer  # preparing 15k examples: tokenizer.py vs tokenizers / transformers (issue 16)

Arguments after the name go to that benchmark (`python -m bench adapters --variants lora,rasa,mosa`).
The comparisons need the test requirements (transformers, peft): `bash run.sh test` installs them.
CPU numbers in BENCHMARKS.md use fp32 (these CPUs have no native bf16) and mostly one thread.
"""
import importlib
import sys

BENCHMARKS = {"model": "bench.model", "adapters": "bench.adapters", "kernels": "bench.kernels",
              "train": "bench.train", "eval": "bench.eval", "fingerprint": "bench.fingerprint",
              "fsdp": "bench.fsdp", "tokenizer": "bench.tokenizer"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"python -m bench {sys.argv[1]}"  # argparse's usage line names the command, not __main__.py
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])
