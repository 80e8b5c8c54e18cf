"""One torch thread for the fine-tuning tests.

These tests run many tiny forward passes; with several OpenMP threads on a shared 2-core
machine, threads spin-wait for each other and a 32-pixel forward took 10x longer than on
one thread (measured under a load of ~7). The previous setting is restored afterwards.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
