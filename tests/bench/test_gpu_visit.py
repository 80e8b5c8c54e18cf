"""The GPU visit kit (bench/gpu_visit.sh, bench/gpu_visit.py) without a GPU: the transfer
plan fits the device tool's limits, the receiving calls notice a lost part, and the last
call's steps run here on the CPU (the rehearsal, smallest sizes, ~35 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_visit.sh"
MIB = 1 << 20


@pytest.fixture(scope="module")
def visit():
    """bench/gpu_visit.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_visit", REPO / "bench" / "gpu_visit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_visit"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_visit", None)


def _nominal(visit, part_mib=60, wheels=16 * MIB, data=4 * MIB):
    step, total = part_mib * MIB, visit.DRY_DALI_BYTES
    parts = [(f".devcarry/dali/part-{i:02d}", min(step, total - i * step))
             for i in range((total + step - 1) // step)]
    rest = [(visit.REST[0], 200), (visit.REST[1], wheels), (visit.REST[2], 4096), (visit.REST[3], data)]
    return parts, rest


def test_plan_moves_everything_in_four_calls_within_the_limits(visit):
    parts, rest = _nominal(visit)
    calls = visit.plan_calls(parts, rest, tree_bytes=1 * MIB)
    assert len(calls) <= 4
    for call in calls:
        assert call.total_bytes <= 64 * MIB and len(call.carry) <= 8 and len(call.command) <= 2000
        assert visit.MANIFEST in call.carry  # every call can check what came before it
    carried = [p for call in calls for p in call.carry]
    assert all(p in carried for p, _ in parts + rest)
    assert calls[-1].command == "bash bench/gpu_visit.sh visit"
    assert calls[-1].timeout_s < 600 and sum(visit.STEP_LIMITS.values()) < calls[-1].timeout_s
    assert [c.command for c in calls[:-1]] == [f"bash bench/gpu_visit.sh receive part-{i:02d}"
                                              for i in range(len(calls) - 1)]


def test_plan_refuses_calls_over_the_limits(visit):
    parts, rest = _nominal(visit, part_mib=63)
    with pytest.raises(visit.PlanError, match="MiB"):
        visit.plan_calls(parts, rest, tree_bytes=2 * MIB)
    parts, rest = _nominal(visit, part_mib=40)
    with pytest.raises(visit.PlanError, match="calls"):
        visit.plan_calls(parts, rest, tree_bytes=1 * MIB)


def test_dry_plan_prints_four_calls():
    proc = subprocess.run(["bash", str(SCRIPT), "plan", "--dry"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = [line for line in proc.stdout.splitlines() if line.startswith("call ")]
    assert 1 <= len(calls) <= 4 and calls[-1].startswith(f"call {len(calls)} of {len(calls)}")
    for line in proc.stdout.splitlines():
        if line.strip().startswith("carry:"):
            assert len(json.loads(line.split(":", 1)[1])) <= 8


def _fake_checkout(tmp_path: Path, n_parts: int = 3) -> Path:
    """A copy of the script beside small DALI parts and their manifest."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "bench" / "gpu_visit.sh")
    dali = root / ".devcarry" / "dali"
    dali.mkdir(parents=True)
    lines = []
    for i in range(n_parts):
        data = os.urandom(1000 + i)
        (dali / f"part-{i:02d}").write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  dali/part-{i:02d}")
    (root / ".devcarry" / "visit.sha256").write_text("\n".join(lines) + "\n")
    return root


def _receive(root: Path, part: str, dali_dir: Path):
    return subprocess.run(["bash", str(root / "bench" / "gpu_visit.sh"), "receive", part],
                          capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "VISIT_DALI_DIR": str(dali_dir)})


def test_each_call_checks_the_parts_sent_before_on_its_first_line(tmp_path):
    root, far = _fake_checkout(tmp_path), tmp_path / "far" / "dali"
    for i in range(3):
        proc = _receive(root, f"part-{i:02d}", far)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first = proc.stdout.splitlines()[0]
        assert first.startswith(f"call {i + 1} of 3: parts before part-{i:02d}:")
        assert all(f"part-{j:02d}" in first for j in range(i))
    assert sorted(p.name for p in far.iterdir()) == ["part-00", "part-01", "part-02"]
    (far / "part-00").unlink()  # the machine was released: a fresh one lacks the first part
    proc = _receive(root, "part-02", far)
    assert proc.returncode == 3 and proc.stdout.startswith("MISSING before part-02: part-00")
    (far / "part-00").write_bytes(b"not it")
    proc = _receive(root, "part-01", far)
    assert proc.returncode == 3 and "part-00 (sha256 differs)" in proc.stdout.splitlines()[0]


def test_a_timed_out_step_fails_the_summary(visit, tmp_path, capsys):
    path = tmp_path / "visit.json"
    visit.init_visit(path, "rehearse", "cpu", "tiny")
    for stage in visit.STAGES:
        visit.record(path, stage, 0, time.time(), 1, f"{stage}.log")
    visit.record(path, "loader", 124, time.time(), 1, "loader.log")
    assert visit.summary(path) == 1
    data = json.loads(path.read_text())
    assert data["stages"]["loader"]["status"] == "timeout" and data["failed"] == ["loader"]
    assert "FAILED: loader" in capsys.readouterr().out


def test_rehearsal_runs_every_step_of_the_last_call_on_the_cpu(shared_data, tmp_path):
    """`bench/gpu_visit.sh rehearse --fast`: every step of the last call, device cpu, the
    smallest sizes; it exits 0 and leaves visit.json with every stage plus one log per step,
    no more files than the device tool brings back (8)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "VISIT_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "rehearse", "--fast"], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads((out / "visit.json").read_text())
    assert result["complete"] and result["ok"] and result["mode"] == "rehearse"
    stages = result["stages"]
    assert list(stages) == ["install", "smoke", "gpu_tests", "dali_gpu", "kernels", "loader",
                            "end_to_end"]
    assert stages["install"]["status"] == "skipped"
    for name in list(stages)[1:]:
        assert stages[name]["status"] == "ok", stages[name]
        assert (out / f"{name}.log").is_file()
    assert stages["gpu_tests"]["result"]["collected"] > 0
    assert stages["smoke"]["result"]["samples"]["dicom_files"] > 0
    assert stages["dali_gpu"]["result"]["batches"]["2"]["slices_per_s"] > 0
    assert stages["kernels"]["result"]["batches"]["2"]["chain_ms"] > 0
    assert stages["loader"]["result"]["slices_per_s"] > 0
    assert stages["end_to_end"]["result"]["pairs_per_s"] > 0
    assert len(list(out.iterdir())) <= 8
    assert proc.stdout.rstrip().splitlines()[-1].startswith("visit ok;")
