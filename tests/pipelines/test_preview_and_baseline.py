"""`tcsmae preview`, the DataLoader baseline and the throughput measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcsmae.bench.preprocess import measure_preprocess, synthetic_batches
from tcsmae.cli import main
from tcsmae.pipelines import edges, masking, windowing
from tcsmae.pipelines.baseline import BaselineDataset, baseline_loader
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.reference import preprocess_slice
from tcsmae.pipelines.source import draw_mask

from pipeline_helpers import make_store


def test_preview_size0_npz_satisfies_the_equations(tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "batch.npz"
    store = tmp_path / "square.zarr"              # one grid for all cases: an NPZ at size 0
    make_store(store, {"a": ((6, 40, 40), True), "b": ((4, 40, 40), False)})
    code = main(["preview", "--data", str(store), "--n", "4", "--seed", "3", "--size", "0",
                 "--out", str(png), "--npz", str(npz)])
    assert code == 0 and png.stat().st_size > 1000
    data = np.load(npz)
    assert data["hu"].shape == (4, 40, 40) and data["original"].shape == (4, 3, 40, 40)
    assert data["mask"].shape == (4, 40, 40) and data["masked"].shape == (4, 3, 40, 40)
    for i in range(4):
        hu = data["hu"][i]
        lung, med = windowing.lung_and_mediastinal(hu, (-500, 1200), (30, 300))
        assert np.array_equal(data["original"][i][0], lung)
        assert np.array_equal(data["original"][i][1], med)
        np.testing.assert_allclose(data["original"][i][2], edges.edge_channel(lung, med),
                                   atol=1e-6)
        k = masking.interval_index(hu, -1000, 500, 8)
        masked_intervals = np.unique(k[data["mask"][i] == 0])
        kept_intervals = np.unique(k[data["mask"][i] == 1])
        assert len(np.intersect1d(masked_intervals, kept_intervals)) == 0
        assert len(masked_intervals) <= 6
        assert np.array_equal(data["masked"][i], data["original"][i] * data["mask"][i][None])


def test_preview_resized_png(tiny_store, tmp_path):
    path, _ = tiny_store
    png, npz = tmp_path / "g.png", tmp_path / "b.npz"
    assert main(["preview", "--data", str(path), "--n", "3", "--size", "32", "--masking",
                 "patch", "--out", str(png), "--npz", str(npz)]) == 0
    assert np.load(npz)["original"].shape == (3, 3, 32, 32)


def test_preview_rows_name_the_store_case(tiny_store):
    from tcsmae.pipelines.preview import preview_batch
    from tcsmae.store.reader import open_store

    path, _ = tiny_store
    batch = preview_batch(path, PipelineConfig(size=32, seed=1), 4)
    ids = open_store(path).case_ids
    assert batch["case_id"] == [ids[i] for i in batch["case_index"]] and set(batch["case_id"]) <= set(ids)


def test_preview_user_errors(tmp_path, capsys):
    assert main(["preview", "--data", str(tmp_path / "nope.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_baseline_dataset_equals_reference():
    cfg = PipelineConfig(size=32)
    slices = synthetic_batches(1, 3, side=64)[0]
    draws = np.stack([draw_mask(cfg, 0, i, (32, 32)) for i in range(3)])
    ds = BaselineDataset(slices, draws, cfg)
    for i in range(3):
        original, masked, mask = ds[i]
        ref = preprocess_slice(slices[i].astype(np.float32), draws[i], cfg)
        np.testing.assert_allclose(original.numpy(), ref["original"], atol=1e-5)
        assert (mask[0].numpy() != ref["mask"]).mean() <= 1e-3
        assert torch.equal(masked, original * mask)


def test_baseline_loader_batches():
    cfg = PipelineConfig(size=16)
    slices = synthetic_batches(1, 4, side=32)[0]
    draws = np.stack([draw_mask(cfg, 0, i, (16, 16)) for i in range(4)])
    original, masked, mask = next(iter(baseline_loader(slices, draws, cfg, 2, workers=0)))
    assert original.shape == (2, 3, 16, 16) and mask.shape == (2, 1, 16, 16)


@pytest.mark.timeout(120)
def test_measure_preprocess_reports_slices_per_second():
    cfg = PipelineConfig(size=32)
    figures = measure_preprocess(synthetic_batches(2, 4, side=64), cfg, "cpu", workers=1,
                                 seconds=0.5)
    assert figures["baseline"]["slices_per_s"] > 0
    assert figures["dali_cpu"]["slices_per_s"] > 0
    assert figures["dali_gpu"] is None
