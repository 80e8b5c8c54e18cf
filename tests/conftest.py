"""Shared fixtures.

`shared_data`: the real CT samples in ../shared/data beside the checkout. Under CI (CI=true)
a missing folder FAILS the test; elsewhere it skips, so a partial checkout still runs.
`gpu` marker: skipped where CUDA is unavailable (the only skip allowed under CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA runtime
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test, restored afterwards (tiny runs on a busy
    2-core machine: spinning OpenMP threads were 3-10x slower, and one thread keeps CPU
    reductions bit-reproducible for the exact-resume tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; fails under CI=true when it is missing."""
    if not (SHARED_DATA / "README.md").is_file():
        message = f"real CT samples not found at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: tests that need them must fail, not skip)")
        pytest.skip(message)
    return SHARED_DATA
