"""`tcsmae info`: summary table, --verify passes on a clean store and names a corrupted case,
its damaged shard file and the exact command that repairs it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tcsmae.cli import main as cli
from tcsmae.store.writer import StoreWriter

from dicom_factory import ct_series, dicom_affine, phantom_hu, write_nifti_labels, write_series


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
    assert "alpha: label slice" in capsys.readouterr().out  # its chunk's crc32c


def test_info_on_a_missing_or_incomplete_store(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "nothing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    store = tmp_path / "s.zarr"
    _make_store(store, "none")
    (store / "slice_index.npz").unlink()
    assert cli(["info", str(store)]) == 2
    assert "incomplete" in capsys.readouterr().err


def _repair_lines(out: str) -> dict[str, str]:
    """case id -> the command printed under "to repair" by `info --verify`."""
    part = out.split("to repair")[1]
    lines = [line.strip() for line in part.splitlines()[1:] if line.strip()]
    return {line.split(": ", 1)[0]: line.split(": ", 1)[1].strip("`") for line in lines}


def _damage_and_repair(store: Path, case_id: str, capsys) -> str:
    """Delete the case's first image shard, check what --verify says, run its repair command."""
    shard = store / "images" / case_id / "c" / "0" / "0" / "0"
    shard.unlink()
    assert cli(["info", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    failed = out.split("verification FAILED:")[1]
    assert f"{case_id}: image slices 0-" in failed and str(shard) in failed and "missing" in failed
    command = _repair_lines(out)[case_id]
    words = shlex.split(command)
    assert words[0] == "tcsmae" and words[-3:] == ["-o", str(store), "--overwrite"]
    assert cli(words[1:]) == 0
    assert cli(["info", str(store), "--verify"]) == 0
    capsys.readouterr()
    return command


def test_verify_gives_the_command_that_repairs_a_nifti_case(tmp_path, capsys):
    """`info --verify` said only "image content digest ... != recorded ..." after a shard was
    deleted, and a re-run of `convert` said "up to date"."""
    hu = phantom_hu(6, 24, 20).transpose(2, 1, 0).astype(np.int16)  # (x, y, z) for NIfTI
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "vol.nii.gz")
    store = tmp_path / "s.zarr"
    assert cli(["convert-nifti", str(tmp_path / "vol.nii.gz"), "--case-id", "chest1", "--patient-id", "P1",
                "-o", str(store), "--no-progress"]) == 0
    command = _damage_and_repair(store, "chest1", capsys)
    assert command == (f"tcsmae convert-nifti {tmp_path / 'vol.nii.gz'} --case-id chest1 --patient-id P1 "
                       f"--codec zstd -o {store} --overwrite")


@pytest.mark.parametrize("extra", [[], ["--case-id", "ct_7"], ["--patient-id", "P9"]])
def test_verify_gives_the_command_that_repairs_a_dicom_case(tmp_path, capsys, extra):
    series = ct_series(n=5, seed=3)
    write_series(series.datasets, tmp_path / "dicom" / "one")
    store = tmp_path / "s.zarr"
    assert cli(["convert", str(tmp_path / "dicom" / "one"), "-o", str(store), "--workers", "1", *extra]) == 0
    case_id = "ct_7" if extra[:1] == ["--case-id"] else series.datasets[0].SeriesInstanceUID
    command = _damage_and_repair(store, case_id, capsys)
    assert command == (f"tcsmae convert {tmp_path / 'dicom' / 'one'} {' '.join(extra)} --codec zstd -o {store} "
                       "--overwrite").replace("  ", " ")


def test_repair_command_is_the_recorded_conversion_from_anywhere(tmp_path, capsys, monkeypatch):
    """Relative paths were stored as typed, --patient-id could be lost, an lz4 store was rebuilt
    as zstd, and a series spread over two folders got the folder of its first file as SRC."""
    series = ct_series(n=6, seed=4)
    write_series(series.datasets[:3], tmp_path / "work" / "dicom" / "one" / "part1")
    write_series(series.datasets[3:], tmp_path / "work" / "dicom" / "one" / "part2")
    write_nifti_labels(np.ones(series.hu.shape, np.uint8), dicom_affine(series), tmp_path / "work" / "seg.nii.gz")
    store = tmp_path / "s.zarr"
    monkeypatch.chdir(tmp_path / "work")
    assert cli(["convert", "dicom/one", "--labels", "seg.nii.gz", "--patient-id", "P7", "--codec", "lz4",
                "-o", str(store), "--workers", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    case_id = series.datasets[0].SeriesInstanceUID
    command = _damage_and_repair(store, case_id, capsys)
    assert command == (f"tcsmae convert {tmp_path / 'work' / 'dicom' / 'one'} --labels {tmp_path / 'work' / 'seg.nii.gz'} "
                       f"--patient-id P7 --codec lz4 -o {store} --overwrite")
    attrs = json.loads((store / "images" / case_id / "zarr.json").read_text())["attributes"]
    assert attrs["codec"] == "lz4" and attrs["patient_id"] == "P7" and attrs["conversion"]["case_id"] is None


def test_repair_command_for_a_case_converted_before_arguments_were_recorded(tmp_path, capsys):
    series = ct_series(n=5, seed=5)
    write_series(series.datasets, tmp_path / "dicom" / "one")
    store = tmp_path / "s.zarr"
    assert cli(["convert", str(tmp_path / "dicom" / "one"), "--codec", "lz4", "-o", str(store), "--workers", "1"]) == 0
    case_id = series.datasets[0].SeriesInstanceUID
    meta = store / "images" / case_id / "zarr.json"
    node = json.loads(meta.read_text())
    del node["attributes"]["conversion"]
    meta.write_text(json.dumps(node))
    (store / "images" / case_id / "c" / "0" / "0" / "0").unlink()
    assert cli(["info", str(store), "--verify"]) == 1
    line = _repair_lines(capsys.readouterr().out)[case_id]
    assert line.startswith(f"tcsmae convert {tmp_path / 'dicom' / 'one'} --codec lz4 -o {store} --overwrite` "
                           "(a best guess: the case was converted before tcsmae recorded its conversion arguments; "
                           "check that SRC holds the whole series"), line
    assert "whether it needs --patient-id" in line


def test_verify_names_the_shard_of_a_damaged_index(tmp_path, capsys):
    """--verify printed only zarr's "Stored and computed checksum do not match. Stored: b']\\xe5&/'"."""
    store = tmp_path / "s.zarr"
    _make_store(store, "zstd")
    shard = store / "images" / "beta" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    assert cli(["info", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "Stored and computed" not in out
    assert f"beta: image slices 0-5: shard file {shard}: index checksum mismatch" in out
    assert "--overwrite" in _repair_lines(out)["beta"]
