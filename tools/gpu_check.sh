#!/usr/bin/env bash
# The prepared GPU check: install what a bare GPU image lacks from a wheel folder (offline), then run
# tools/gpu_check.py. Usage:
#   tools/gpu_check.sh [--device cuda|cpu] [--out DIR] [--wheels DIR] [-- extra gpu_check.py arguments]
#   tools/gpu_check.sh --build-wheels [--wheels DIR]      # on a machine with the package registry, beforehand
# The wheel folder (default: wheels/ at the repository root, git-ignored: pass it as carry to travel) holds
# diffusers, deepspeed (a pure-Python wheel built with DS_BUILD_OPS=0) and the dependencies a bare image with torch,
# transformers, peft, accelerate, einops, opencv and tensorboard lacks, for CPython 3.12 on manylinux x86_64.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$ROOT/wheels"
OUT="$ROOT/runs/gpu_check"
DEVICE=cuda
BUILD=0
EXTRA=()
# Pinned to the versions this project is tested with; the dependencies are those the bare image lacks.
PACKAGES=(diffusers==0.42.1 hjson msgpack ninja py-cpuinfo pydantic nvidia-ml-py importlib_metadata zipp regex)
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --build-wheels) BUILD=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --device cuda|cpu, --out DIR, --wheels DIR, --build-wheels)" >&2
       exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac

if [ "$BUILD" = 1 ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$WHEELS" "${PACKAGES[@]}" pydantic_core annotated_types typing_inspection
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHEELS" deepspeed==0.19.8
  du -sh "$WHEELS"
  exit 0
fi

# Install only what is missing, offline, from the folder.
if ! "$PY" -c "import diffusers, deepspeed" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: wheel folder $WHEELS does not exist; build it beforehand with tools/gpu_check.sh --build-wheels" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" diffusers deepspeed
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DS_BUILD_OPS=0
cd "$ROOT"
exec "$PY" tools/gpu_check.py --device "$DEVICE" --out "$OUT" "${EXTRA[@]}"
