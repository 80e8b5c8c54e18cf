"""Training tests: one torch thread (see tests/conftest.py); exact-resume tests compare
losses bit for bit, which a fixed thread count keeps reproducible."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
