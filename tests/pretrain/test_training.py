"""Short CPU training runs: the loss goes down, checkpoints reload with weights_only=True,
a resumed run repeats the uninterrupted one step for step, and export loads into smp."""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import segmentation_models_pytorch as smp
import torch

from tcsmae.checkpoint import check_resume_compatible, load_checkpoint
from tcsmae.distributed import DistContext
from tcsmae.errors import UserError
from tcsmae.pretrain.batches import SyntheticBatches
from tcsmae.pretrain.config import TrainConfig, preset
from tcsmae.pretrain.engine import pretrain
from tcsmae.pretrain.model import TCSMAE
from tcsmae.pretrain.step import build_training
from tcsmae.stopping import TrainingStopped

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOSS_KEYS = ("loss", "loss_ssim", "loss_con", "temperature")


def tiny_config(**changes) -> TrainConfig:
    cfg = preset("demo")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, size=64), batch_size=4, steps_per_epoch=3,
                  epochs=2, checkpoint_every=2, image_every=0, lr=1e-3)
    return replace(cfg, **changes)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    """2 phantom cases x 8 slices of 64x64, converted: 4 batches of 4 per epoch."""
    from tcsmae.convert import dicom_to_zarr
    from tcsmae.phantom.anatomy import PhantomConfig
    from tcsmae.phantom.dicom import write_phantom

    root = tmp_path_factory.mktemp("phantom")
    write_phantom(PhantomConfig(cases=2, size=64, slices=8), root / "src", progress=False)
    store = root / "ph.zarr"
    assert dicom_to_zarr.main(["--manifest", str(root / "src" / "manifest.csv"), "-o", str(store),
                               "--workers", "1"]) == 0
    return store


def run_cli(*argv) -> int:
    from tcsmae.cli import main

    return main(["pretrain", "--preset", "demo", "--size", "64", "--batch-size", "4", "--workers", "0",
                 "--lr", "1e-3", "--checkpoint-every", "3", *map(str, argv)])


def test_resume_from_one_epoch_repeats_the_two_epoch_run(phantom_store, tmp_path, capsys):
    """Real loader on phantom slices, through the CLI: 2 epochs straight == 1 epoch + resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("--data", phantom_store, "--out", a, "--epochs", 2) == 0
    assert run_cli("--data", phantom_store, "--out", b, "--epochs", 1) == 0
    ckpt = load_checkpoint(b / "checkpoints" / "last.pt")
    assert ckpt["data_position"] == {"epoch": 1, "step": 0} and ckpt["step"] == 4
    # --resume alone finds the data (recorded in the checkpoint) and the run folder (its parent)
    assert ckpt["store"] == str(phantom_store.resolve())
    shutil.copytree(b, tmp_path / "b_copy")
    assert run_cli("--resume", b / "checkpoints" / "last.pt", "--data", phantom_store, "--out", b,
                   "--epochs", 2) == 0
    assert run_cli("--resume", tmp_path / "b_copy" / "checkpoints" / "last.pt", "--epochs", 2) == 0
    ma, mb = metrics(a), metrics(b)
    assert [m["loss"] for m in metrics(tmp_path / "b_copy")] == [m["loss"] for m in mb]
    assert [m["step"] for m in mb] == list(range(1, 9))  # global steps; the resumed run appended
    for key in LOSS_KEYS:
        assert [m[key] for m in ma] == [m[key] for m in mb], key  # bit-identical on the CPU
    assert len({m["loss"] for m in ma}) == 8  # real, changing values
    assert mb[4]["lr"] == pytest.approx(1e-3 * 0.96) and mb[3]["lr"] == pytest.approx(1e-3)
    for key in ("epoch", "loss_ssim", "loss_con", "temperature", "pairs_per_s"):
        assert key in mb[0]
    assert json.loads((b / "config.json").read_text())["epochs"] == 2
    capsys.readouterr()
    assert run_cli("--resume", b / "checkpoints" / "last.pt") == 0  # finished: says how to go on
    said = capsys.readouterr().out
    assert "has finished all 2 epochs" in said and "--epochs 12" in said
    assert [m["step"] for m in metrics(b)] == list(range(1, 9))  # and trained nothing
    assert any((a / "tensorboard").iterdir())

    # mid-epoch: crash after the checkpoint at step 6 (epoch 1, batch 2), resume from it
    from tcsmae.pretrain.batches import StoreBatches
    from tcsmae.pretrain.config import config_from_dict

    cfg = config_from_dict(json.loads((a / "config.json").read_text()))

    class Crash(StoreBatches):
        def __call__(self, epoch, start_step):
            for i, batch in enumerate(super().__call__(epoch, start_step)):
                if (epoch, start_step + i) == (1, 3):
                    raise KeyboardInterrupt
                yield batch

    c = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, Crash(phantom_store, cfg, CPU), c, CPU)
    ckpt = load_checkpoint(c / "checkpoints" / "last.pt")
    assert ckpt["data_position"] == {"epoch": 1, "step": 2}
    pretrain(cfg, StoreBatches(phantom_store, cfg, CPU), c, CPU, resume=ckpt)
    mc = metrics(c)
    assert [m["step"] for m in mc] == list(range(1, 9))
    assert [m["loss"] for m in mc] == [m["loss"] for m in ma]


def test_short_training_on_phantom_slices_lowers_the_loss(phantom_store, tmp_path):
    assert run_cli("--data", phantom_store, "--out", tmp_path, "--epochs", 4, "--lr", "2e-3",
                   "--checkpoint-every", 0) == 0
    m = metrics(tmp_path)
    assert len(m) == 16
    first, last = m[:4], m[-4:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < min(r["loss"] for r in first)
    assert mean(last, "loss_ssim") < 0.8 * mean(first, "loss_ssim")


def test_resize_or_new_heads_on_resume_are_refused(phantom_store, tmp_path, capsys):
    assert run_cli("--data", phantom_store, "--out", tmp_path, "--epochs", 1, "--steps-per-epoch", 1) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    code = run_cli("--resume", last, "--data", phantom_store, "--out", tmp_path, "--size", 96, "--epochs", 2)
    assert code == 2
    assert "trained at 64x64" in capsys.readouterr().err
    code = run_cli("--resume", last, "--data", phantom_store, "--out", tmp_path, "--mep-levels", "F5", "--epochs", 2)
    assert code == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_resume_mid_epoch_continues_the_data_position(tmp_path):
    cfg = tiny_config(epochs=1, steps_per_epoch=4, checkpoint_every=2)
    source = SyntheticBatches(4, 64, steps_per_epoch=4, seed=2)
    straight = pretrain(cfg, source, tmp_path / "a", CPU)

    class Crash(SyntheticBatches):
        def __call__(self, epoch, start_step):
            for i, batch in enumerate(super().__call__(epoch, start_step)):
                if start_step + i == 3:
                    raise KeyboardInterrupt  # dies after the checkpoint at step 2
                yield batch

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, Crash(4, 64, steps_per_epoch=4, seed=2), tmp_path / "b", CPU)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["data_position"] == {"epoch": 0, "step": 2}
    resumed = pretrain(cfg, source, tmp_path / "b", CPU, resume=ckpt)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2, 3, 4]  # step 3 logged once


class Signalled(SyntheticBatches):
    """Sends `signals` to this process while fetching the batch of step index `at`."""

    at: int = 2
    signals: tuple = (signal.SIGTERM,)

    def __call__(self, epoch, start_step):
        for i, batch in enumerate(super().__call__(epoch, start_step)):
            if epoch == 0 and start_step + i == self.at:
                for sig in self.signals:
                    os.kill(os.getpid(), sig)
            yield batch


def test_sigterm_finishes_the_step_saves_it_and_resume_repeats_the_run(tmp_path):
    cfg = tiny_config(epochs=2, steps_per_epoch=4, checkpoint_every=0)
    source = SyntheticBatches(4, 64, steps_per_epoch=4, seed=2)
    straight = pretrain(cfg, source, tmp_path / "a", CPU)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        pretrain(cfg, Signalled(4, 64, steps_per_epoch=4, seed=2), tmp_path / "b", CPU)
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 3)  # step 3 was trained
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["data_position"] == {"epoch": 0, "step": 3}
    resumed = pretrain(cfg, source, tmp_path / "b", CPU, resume=ckpt)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    assert [m["step"] for m in metrics(tmp_path / "b")] == list(range(1, 9))


def test_a_second_ctrl_c_interrupts_at_once(tmp_path, monkeypatch):
    from tcsmae.stopping import GracefulStop

    monkeypatch.setattr(GracefulStop, "REPEAT_S", -1.0)  # a repeat this soon counts as a second press
    cfg = tiny_config(epochs=1, steps_per_epoch=4, checkpoint_every=0)
    twice = Signalled(4, 64, steps_per_epoch=4, seed=2)
    twice.signals = (signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, twice, tmp_path, CPU)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing saved mid-step


def test_sigterm_through_the_cli_exits_143_with_a_resumable_checkpoint(phantom_store, tmp_path):
    """A real process on the real loader, stopped by SIGTERM as a scheduler would."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tcsmae.cli", "pretrain", "--preset", "demo", "--size", "64", "--batch-size", "4",
           "--workers", "0", "--epochs", "1000", "--checkpoint-every", "0", "--log-every", "1",
           "--data", str(phantom_store), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, text
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert "stopped by SIGTERM after step" in text and "--resume" in text
    assert ckpt["step"] >= 2 and ckpt["step"] == len(metrics(out))  # no trained step lost


def test_checkpoint_is_weights_only_and_export_loads_into_smp(tmp_path):
    cfg = tiny_config(epochs=1, steps_per_epoch=2)
    pretrain(cfg, SyntheticBatches(4, 64, steps_per_epoch=2), tmp_path / "run", CPU,
             pretraining_cases={"salt": "ab", "series_digests": ["x"], "patient_digests": ["y"]})
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    raw = torch.load(path, weights_only=True)  # plain containers only
    for key in ("model", "optimizer", "scheduler", "scaler", "temperature", "epoch", "step",
                "data_position", "rng", "config", "input_size"):
        assert key in raw
    assert raw["config"]["model"]["encoder"] == "mit_b0" and raw["input_size"] == 64

    from tcsmae.cli import main

    assert main(["export", str(path), "-o", str(tmp_path / "weights.pt")]) == 0
    weights, meta_path = tmp_path / "weights.pt", tmp_path / "weights.json"
    meta = json.loads(meta_path.read_text())
    assert meta_path.name == "weights.json"
    assert meta["encoder"] == "mit_b0" and meta["activation"] == "sigmoid" and meta["input_size"] == 64
    assert meta["channels"] == ["lung", "mediastinal", "edge"] and meta["K"] == 8 and meta["rho"] == 0.75
    assert meta["pretraining_cases"]["salt"] == "ab"
    assert meta["versions"]["torch"] == torch.__version__
    unet = smp.Unet(encoder_name=meta["encoder"], encoder_weights=None, in_channels=3, classes=3)
    unet.load_state_dict(torch.load(weights, weights_only=True), strict=True)

    core = TCSMAE(cfg.model, 64, cfg.loss)
    core.load_state_dict(raw["model"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(unet.eval()(x)), core.eval().reconstruct(x), atol=0, rtol=0)

    with pytest.raises(UserError, match="trained at 64x64"):
        check_resume_compatible(raw, path, input_size=128, encoder="mit_b0")
    with pytest.raises(UserError, match="encoder"):
        check_resume_compatible(raw, path, input_size=64, encoder="mit_b1")


def test_non_finite_losses_skip_steps_then_abort(tmp_path):
    class Poisoned(SyntheticBatches):
        def batch(self, epoch, step):
            b = super().batch(epoch, step)
            b["original"][0, 0, 0, 0] = float("nan")
            return b

    cfg = tiny_config(epochs=1, steps_per_epoch=4, max_nonfinite=3, checkpoint_every=0)
    setup = build_training(cfg, CPU)
    before = {k: v.clone() for k, v in setup.core.state_dict().items()}
    with pytest.raises(UserError, match="3 non-finite losses in a row"):
        pretrain(cfg, Poisoned(4, 64, steps_per_epoch=4), tmp_path, CPU, setup=setup)
    lines = metrics(tmp_path)
    assert len(lines) == 3 and all(m["skipped"] and m["loss"] is None for m in lines)
    assert lines[0]["slices"] == [[0, 0], [1, 1], [2, 2], [3, 3]]  # (case_index, z) of the batch
    after = setup.core.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights and BN statistics


@pytest.mark.parametrize("variant", ["scales0", "authors"])
def test_ablation_variants_train(tmp_path, variant):
    from tcsmae.pretrain.command import VARIANTS
    from tcsmae.pretrain.config import apply_overrides

    overrides = {"model": {"mep_levels": []}} if variant == "scales0" else VARIANTS["authors"]
    cfg = apply_overrides(tiny_config(epochs=1, steps_per_epoch=2, checkpoint_every=0), overrides)
    pos = pretrain(cfg, SyntheticBatches(4, 64, steps_per_epoch=2), tmp_path, CPU)
    for h in pos.history:
        assert h["temperature"] is None
        if variant == "scales0":
            assert h["loss_con"] == 0.0 and h["loss"] == h["loss_ssim"]
        else:
            assert 0 < h["loss_con"] <= 3 * 2000  # 1000 * (1 - cos) <= 2000 per level, F3..F5


def test_a_sigterm_during_a_step_stops_after_that_step(tmp_path):
    """One process: a signal that arrives while step 3 runs (a scheduler does not wait for a
    step boundary) saves step 3, not step 4: on a slow machine one more step can outlast the
    grace period."""
    cfg = tiny_config(epochs=1, steps_per_epoch=6, checkpoint_every=0)
    setup = build_training(cfg, CPU)
    graph, calls = setup.graph, []

    def signalled_graph(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return graph(*args)

    setup.graph = signalled_graph
    with pytest.raises(TrainingStopped) as stopped:
        pretrain(cfg, SyntheticBatches(4, 64, steps_per_epoch=6, seed=2), tmp_path, CPU, setup=setup)
    assert stopped.value.step == 3 and len(calls) == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
