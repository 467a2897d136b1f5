#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU: real gloo process groups, tiny models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh
ruff check seg_dist tests lab conftest.py
python -m pytest -q "$@"
