#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU: real gloo process groups, tiny models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh
ruff check seg_dist tests lab conftest.py
# The smp tests need segmentation_models_pytorch with a torchvision matching torch: a 6 GB environment of its
# own, about 2 minutes to install (README, "Architectures and pretrained encoders"), which does not fit CI's
# time. Say so in one line; the tests that need smp skip, the rest of those files run.
if ! python -c "import segmentation_models_pytorch" >/dev/null 2>&1; then
    echo "smp tests skipped (no segmentation_models_pytorch in .venv): run them with" \
         "${SEG_DIST_SMP_VENV:-../smp-venv}/bin/python -m pytest tests/test_smp*.py tests/test_weights.py"
fi
python -m pytest -q "$@"
