"""What both test suites share (the product's in tests/, the lab's in lab/tests/): CUDA hidden, tiny shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suites are about behaviour on CPU with gloo (what CI has). On a GPU machine, 2 ranks would each
# want a GPU of their own; hide CUDA unless asked, for this process and every process it starts.
if not os.environ.get("SEG_DIST_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 synthetic 32 px samples (64 train, 16 val) in uneven shards of 12."""
    from seg_dist import pack

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    pack.pack_synthetic(out, n=80, size=32, samples_per_shard=12, workers=1)
    return out
