"""nanoMASA benchmarks: `python -m bench NAME [args]` from the repository root (see bench/README.md)."""
