#!/usr/bin/env bash
# Creates .venv (once) and installs seg_dist with its dev tools. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# Install torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build where a
# CPU wheel is all that is needed. A torch already in the venv (e.g. a CUDA build) is kept.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==${SEG_DIST_TORCH:-2.13.0}"
fi
python -m pip install -q -e '.[dev,export]'
