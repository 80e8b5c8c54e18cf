"""Fixtures of the pipeline tests: tiny stores built with the real StoreWriter, real slices."""

from __future__ import annotations

import pytest

from pipeline_helpers import make_store, real_hu_slices


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """Three cases, int16 and float32, one non-square: 24 slices of <= 48 px."""
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    volumes = make_store(path, {"a": ((10, 48, 48), True), "b": ((8, 48, 48), False),
                                "c": ((6, 40, 48), True)}, labels=True)
    return path, volumes


@pytest.fixture(scope="session")
def real_hu(shared_data):
    """Three real CT slices, (3, 512, 512) float32 HU."""
    return real_hu_slices(shared_data, 3)
