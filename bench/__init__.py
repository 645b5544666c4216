"""nanoMASA benchmarks: `python -m bench NAME [args]` from the repository root (see bench/README.md)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root: train.py, model.py; the benchmarks' children run there
