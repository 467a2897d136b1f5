"""Whether segmentation_models_pytorch can be imported here, and the skip marker for the tests that need it.

Its own module rather than helpers.py: processes the tests spawn import helpers, and importing smp costs
about 2 seconds. The project venv has no smp (a 6 GB environment of its own; README, "Architectures and
pretrained encoders"), so there these tests skip and say how to run them."""

from __future__ import annotations

import pytest

try:
    import segmentation_models_pytorch  # noqa: F401

    SMP_MISSING = ""
except Exception as e:  # ImportError, or RuntimeError from a torchvision built for another torch
    SMP_MISSING = f"{type(e).__name__}: {e}"

needs_smp = pytest.mark.skipif(
    bool(SMP_MISSING),
    reason=f"segmentation_models_pytorch is not importable ({SMP_MISSING[:120]}); run the smp tests with the smp "
    "environment: ../smp-venv/bin/python -m pytest tests/test_smp*.py tests/test_weights.py",
)
