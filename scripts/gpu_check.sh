#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): attention exactness on packed and padding-free rows, one-step loss without
# DeepSpeed / ZeRO-2 / ZeRO-3 in bf16, host syncs in the micro-step, and 1B-shape throughput (ZeRO-2, ZeRO-3, TRL).
# No hub access; sized for a few minutes on one H100; writes bench/results/<date>-<gpu>.json. Run from the repository root
# in the project's virtualenv (TRL for the comparison: pip install -r bench/requirements.txt -c constraints.txt), or
# on a machine without a package index after scripts/device_wheels.sh filled .whl/ here and .whl/ travelled with the
# tree: its wheels are then installed into /tmp/llmhalluc-site over the machine's own packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/llmhalluc-site .whl/*.whl
  export PYTHONPATH=/tmp/llmhalluc-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} # llmhalluc without an install, also in the launched processes
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --cpu-smoke on CPU'"
exec python bench/gpu_check.py "$@"
