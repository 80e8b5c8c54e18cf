"""`tcsmae ablate` for real on phantom stores (mit_b0, 32 px, 3 pretraining epochs of 2 steps,
1 fine-tuning epoch, 1 fold): a 2-arm grid runs in a child process that is killed (SIGKILL)
once its pretraining has written a checkpoint; the same command then finishes the grid
without redoing a finished step, the pretraining continuing from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Pretraining store: 2 phantom cases x 4 slices; labelled store: 3 other patients x 4 slices."""
    from tcsmae.cli import main
    from tcsmae.phantom.anatomy import PhantomConfig
    from tcsmae.phantom.dicom import write_phantom

    root = tmp_path_factory.mktemp("ablate")
    for name, cases, seed in (("pre", 2, 10), ("lab", 3, 11)):
        write_phantom(PhantomConfig(cases=cases, size=64, slices=4, seed=seed), root / name, progress=False)
        assert main(["convert", "--manifest", str(root / name / "manifest.csv"), "-o", str(root / f"{name}.zarr"),
                     "--workers", "1"]) == 0
    return root


def _argv(root, out):
    grid = root / "grid.json"
    grid.write_text(json.dumps({"name": "two", "arms": [{"name": "scratch", "objective": "scratch"},
                                                        {"name": "tcs-mae", "objective": "tcs-mae"}]}))
    return ["ablate", "--data", str(root / "pre.zarr"), "--labelled", str(root / "lab.zarr"), "--out", str(out),
            "--grid", str(grid), "--labels-map", "phantom-lesion", "--encoder", "mit_b0", "--size", "32",
            "--pretrain-epochs", "3", "--steps-per-epoch", "2", "--pretrain-batch-size", "2", "--epochs", "1",
            "--batch-size", "4", "--folds", "1", "--lr", "1e-3", "--device", "cpu", "--workers", "0"]


def test_two_arm_grid_resumes_after_a_kill(stores, tmp_path, monkeypatch):
    import tcsmae.ablate.run as ablate_run
    from tcsmae.cli import main

    out = tmp_path / "out"
    argv = _argv(stores, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "tcsmae.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env)
        deadline = time.monotonic() + 600
        try:
            while child.poll() is None and time.monotonic() < deadline:
                if list(out.glob("pretrain/*/checkpoints/last.pt")):
                    break
                time.sleep(0.02)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]
    (scratch,) = out.glob("finetune/scratch-*")
    assert json.loads((scratch / "results.json").read_text())["complete"]  # finished before the kill
    scratch_mtime = (scratch / "results.json").stat().st_mtime_ns
    (run_dir,) = out.glob("pretrain/tcs-mae-*")
    assert not (run_dir / "weights.json").exists()  # killed inside the pretrained arm

    calls = []
    monkeypatch.setattr(ablate_run, "tcsmae_main", lambda a: calls.append(list(a)) or main(a))
    assert main(argv) == 0
    assert [c[0] for c in calls] == ["pretrain", "export", "finetune", "report"]  # scratch is done
    assert calls[0][:2] == ["pretrain", "--resume"]  # continued from the checkpoint, not restarted
    assert calls[2][calls[2].index("--init") + 1] == str(run_dir / "weights.pt")
    assert (scratch / "results.json").stat().st_mtime_ns == scratch_mtime  # never recomputed
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 epochs x 2 steps, each once
    assert json.loads((run_dir / "weights.json").read_text())["trained"]["steps_done"] == 6
    doc = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in doc["arms"]] == ["scratch", "tcs-mae"]
    assert doc["arms"][1]["settings"]["masking"] == "tissue" and doc["arms"][1]["n_cases"] == 3
    summary = (out / "summary.md").read_text()
    assert "| tcs-mae |" in summary and "Wilcoxon" in summary and (out / "dsc_by_arm.png").is_file()
    calls.clear()
    assert main(argv) == 0
    assert [c[0] for c in calls] == ["report"]  # all done: only the report is written again
