"""Training tests run torch on one intra-op thread: the runs are tiny (64 px), a fixed thread
count makes CPU reductions bit-reproducible (resume tests compare losses exactly), and on a
busy 2-core machine two spinning OpenMP threads were 3-4x slower than one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
