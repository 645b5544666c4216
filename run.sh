#!/usr/bin/env bash
# nanoMASA's one entry point: makes a virtual environment in .venv (CPU PyTorch, pinned), installs
# what the job needs, and runs it. Works offline apart from the Python package registry.
#
#   bash run.sh demo      # the embedded default: a complete offline MASA experiment on a CPU
#   bash run.sh test      # the whole test suite (what CI runs)
#   bash run.sh compare   # the paper's Table-1-style comparison at demo scale
#
# PYTHON=/path/to/python3.11 picks the interpreter; VENV=dir picks the environment folder.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

pick_python() {
    for p in "${PYTHON:-}" python3.11 python3.12 python3 python; do
        [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
        if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    echo "error: no Python >= 3.10 found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
    exit 1
}

# install requirements file $1 into the venv (pip options after it), once per change of that file
setup() {
    local req=$1 stamp="$VENV/.installed-$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[setup] creating $VENV"
        "$(pick_python)" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
        echo "[setup] pip install -r $req (torch is pinned to 2.13.0: the CPU build here)"
        # (the grep drops this machine's pip notes about missing local index folders; errors still show)
        "$VENV/bin/python" -m pip install -q "${@:2}" -r "$req" 2> >(grep -v "is ignored: it is neither" >&2)
        touch "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    test)
        setup requirements-test.txt
        setup requirements-test-nodeps.txt --no-deps
        exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
        ;;
    demo)
        setup requirements.txt
        exec "$VENV/bin/python" demo.py "$@"
        ;;
    compare)
        setup requirements.txt
        exec "$VENV/bin/python" demo.py --compare "$@"
        ;;
    *)
        echo "usage: bash run.sh {demo|test|compare} [args...]" >&2
        exit 2
        ;;
esac
