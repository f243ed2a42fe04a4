#!/usr/bin/env bash
# Wheels for running scripts/gpu_check.sh on a GPU machine that cannot reach a package index (this workplace's lent
# H200: Python 3.12, torch 2.11 + CUDA, transformers 5.17, accelerate 1.15, numpy, pyarrow, pandas, matplotlib, no
# DeepSpeed, datasets or TRL). Run here, where pip reaches the index; it fills .whl/ (git-ignored, ~25 MB) with the
# versions constraints.txt pins of what that machine lacks or has too old, for CPython 3.12 on x86-64 Linux.
# scripts/gpu_check.sh installs them into /tmp/llmhalluc-site when .whl/ is there. torch and the heavy compiled
# packages stay the machine's own. Tested by installing the same set over such an image's versions in a Python 3.12
# virtualenv with torch 2.11 and running the check's CPU sections (docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WHEELS=(transformers tokenizers datasets trl peft deepspeed dill multiprocess fsspec hjson pydantic pydantic_core
  annotated-types typing-inspection regex py-cpuinfo)
pin() { # the constraints.txt line of a package, whatever its spelling of - and _
  local pattern="^${1//[-_]/[-_]}=="
  grep -iE "$pattern" constraints.txt | head -1 || { echo "$1 is not pinned in constraints.txt" >&2; exit 2; }
}
rm -rf .whl && mkdir .whl
for name in "${WHEELS[@]}"; do
  spec=$(pin "$name")
  if [ "$name" = deepspeed ]; then # published as a source archive only: built here (no compiled ops: pure Python)
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$spec"
    continue
  fi
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls .whl
du -sh .whl
