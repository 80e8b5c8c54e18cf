"""`tcsmae info`: summary table, --verify passes on a clean store and names a corrupted case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tcsmae.cli import main as cli
from tcsmae.convert.store import StoreWriter


def _attrs(seed: int, warnings=()) -> dict:
    return {"spacing_mm": [2.5, 0.8, 0.8], "origin_mm": [0.0, 0.0, 0.0], "direction": np.eye(3).tolist(),
            "z_positions_mm": [2.5 * k for k in range(6)], "patient_id": f"P{seed}", "study_uid": "",
            "series_uid": "", "source_sha256": f"{seed:064x}", "warnings": list(warnings)}


def _make_store(path: Path, codec: str) -> None:
    rng = np.random.default_rng(0)
    with StoreWriter(path, codec=codec) as w:
        for i, cid in enumerate(["alpha", "beta"]):
            hu = rng.integers(-1024, 1500, (6, 40, 48)).astype(np.int16)
            labels = (hu > 0).astype(np.uint8)
            w.write_case(cid, hu, _attrs(i, ["gap between slices 2 and 3"] if cid == "beta" else ()), labels=labels)


def test_info_prints_cases_and_totals(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    _make_store(store, "zstd")
    assert cli(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "beta" in out
    assert "2 cases, 12 slices, 2 with labels" in out
    assert "beta: gap between slices 2 and 3" in out
    assert "40x48" in out and "2.5,0.8,0.8" in out
    assert "on disk" in out


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_verify_names_the_corrupted_case(tmp_path, capsys, codec):
    store = tmp_path / "s.zarr"
    _make_store(store, codec)
    assert cli(["info", str(store), "--verify"]) == 0
    printed = capsys.readouterr()
    assert "verified" in printed.out
    assert "verify:" not in printed.err  # stderr is not a TTY here: no progress bar in the log

    shard = next(p for p in sorted((store / "images" / "beta").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    pos = len(data) // 3  # inside the chunk data, away from the shard index at the end
    data[pos] ^= 0x5A
    shard.write_bytes(bytes(data))

    assert cli(["info", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    failed_part = out.split("verification FAILED:")[1]
    assert "beta:" in failed_part and "alpha" not in failed_part
    assert "alpha" in out and "OK" in out.split("beta")[0]


def test_verify_catches_a_corrupted_label_map(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    _make_store(store, "none")
    shard = next(p for p in sorted((store / "labels" / "alpha").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli(["info", str(store), "--verify"]) == 1
    assert "alpha: label content digest" in capsys.readouterr().out


def test_info_on_a_missing_or_incomplete_store(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "nothing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    store = tmp_path / "s.zarr"
    _make_store(store, "none")
    (store / "slice_index.npz").unlink()
    assert cli(["info", str(store)]) == 2
    assert "incomplete" in capsys.readouterr().err
