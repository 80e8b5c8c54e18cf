"""Slice source: sharding, epochs, body-fraction filter, resume (source and loader)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.loader import make_loader
from tcsmae.pipelines.source import SliceSource
from tcsmae.store.reader import open_store


class _Info:
    def __init__(self, iteration, epoch_idx):
        self.iteration, self.epoch_idx = iteration, epoch_idx


@pytest.mark.parametrize("world_size, batch_size", [(1, 4), (2, 3), (3, 2), (2, 5)])
def test_shards_disjoint_equal_and_covering(tiny_store, world_size, batch_size):
    path, _ = tiny_store
    n_slices = open_store(path).n_slices                        # 24
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            src = SliceSource(path, PipelineConfig(size=32), batch_size, rank, world_size)
            ids = np.concatenate([src.batch_ids(epoch, s) for s in range(src.n_batches)])
            assert src.n_batches == n_slices // (batch_size * world_size)
            per_rank.append(ids)
        sizes = {len(ids) for ids in per_rank}
        assert len(sizes) == 1                                  # equal batch counts
        union = np.concatenate(per_rank)
        assert len(np.unique(union)) == len(union)              # disjoint
        dropped = n_slices - len(union)
        assert 0 <= dropped < batch_size * world_size           # covering but the remainder


def test_epochs_are_reshuffled(tiny_store):
    path, _ = tiny_store
    src = SliceSource(path, PipelineConfig(size=32), 24)
    a, b = src.epoch_slices(0), src.epoch_slices(1)
    assert sorted(a) == sorted(b) == list(range(24)) and not np.array_equal(a, b)


def test_source_outputs_and_stop(tiny_store):
    path, volumes = tiny_store
    store = open_store(path)
    src = SliceSource(path, PipelineConfig(size=32), 4, with_labels=True, stacked=False)
    hu, draw, case, z, label = src(_Info(0, 0))
    assert len(hu) == 4 and all(h.dtype == np.float32 and h.shape == (48, 48) for h in hu)
    assert all(d.shape == (8,) and d.sum() == 6 for d in draw)
    for h, c, zz, lab in zip(hu, case, z, label):
        case_id = store.case_ids[int(c[0])]
        vol, labels = volumes[case_id]
        if vol.shape[1:] == (48, 48):
            assert np.array_equal(h, vol[int(zz[0])])
            assert np.array_equal(lab, labels[int(zz[0])])
        else:                                                   # (40, 48): 4 air rows on top
            assert np.array_equal(h[4:44], vol[int(zz[0])]) and (h[:4] == -1024).all()
            assert (lab[:4] == 0).all() and lab.dtype == np.int16
    with pytest.raises(StopIteration):
        src(_Info(src.n_batches, 0))
    # stacked (the default when, as here, every case pads to one grid): the same batch as
    # one array per output
    stacked = SliceSource(path, PipelineConfig(size=32), 4, with_labels=True)
    assert stacked.stacked
    columns = stacked(_Info(0, 0))
    assert all(len(c) == 1 for c in columns)
    assert np.array_equal(columns[0][0], np.stack(hu)) and columns[2][0].shape == (4, 1)
    assert np.array_equal(columns[4][0], np.stack(label))


def test_stacked_only_where_possible(tiny_store, tmp_path):
    path, _ = tiny_store
    assert not SliceSource(path, PipelineConfig(size=0), 4).stacked        # 48x48 and 40x48
    assert not SliceSource(path, PipelineConfig(size=32, augment=True), 4).stacked
    with pytest.raises(UserError, match="stacked"):
        SliceSource(path, PipelineConfig(size=0), 4, stacked=True)


def test_body_fraction_filter(tiny_store):
    path, _ = tiny_store
    store = open_store(path)
    threshold = float(np.median(store.body_fraction))
    src = SliceSource(path, PipelineConfig(size=32, body_fraction_min=threshold), 2)
    ids = src.epoch_slices(0)
    assert len(ids) > 0 and (store.body_fraction[ids] >= threshold).all()
    assert len(src.eligible) == int((store.body_fraction >= threshold).sum())
    with pytest.raises(UserError, match="body_fraction_min"):
        SliceSource(path, PipelineConfig(size=32, body_fraction_min=1.0), 2)


def test_bad_arguments_are_user_errors(tiny_store):
    path, _ = tiny_store
    with pytest.raises(UserError, match="rank"):
        SliceSource(path, PipelineConfig(), 2, rank=2, world_size=2)
    with pytest.raises(UserError, match="resume step"):
        SliceSource(path, PipelineConfig(), 4, step=6)
    with pytest.raises(UserError, match="does not exist"):
        SliceSource(path.parent / "missing.zarr", PipelineConfig(), 4)


def _collect(loader, n_batches):
    out = []
    it = iter(loader)
    while len(out) < n_batches:
        try:
            out.append({k: v.clone() for k, v in next(it).items()})
        except StopIteration:
            it = iter(loader)
    return out


def test_resume_gives_the_same_following_batches(tiny_store):
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    full = make_loader(path, cfg, batch_size=5, py_workers=0, num_threads=1)
    assert len(full) == 4
    run = _collect(full, 7)                                   # epoch 0: 4 batches, epoch 1: 3
    assert full.position == (1, 3)
    resumed = make_loader(path, cfg, batch_size=5, epoch=0, step=2, py_workers=0,
                          num_threads=1)
    assert resumed.position == (0, 2)
    tail = _collect(resumed, 5)
    for a, b in zip(run[2:], tail):
        for key in ("original", "masked", "mask", "case_index", "z"):
            assert torch.equal(a[key], b[key]), key
    # a new epoch draws new masks for the same slice (27 of 28 interval pairs differ)
    def masks(batches):
        return {(int(c), int(z)): m for b in batches
                for c, z, m in zip(b["case_index"], b["z"], b["mask"])}
    epoch0, epoch1 = masks(run[:4]), masks(run[4:])
    common = set(epoch0) & set(epoch1)
    assert len(common) >= 5
    assert sum(not torch.equal(epoch0[k], epoch1[k]) for k in common) >= len(common) // 2


def test_next_epoch_reuses_the_pipeline_after_exactly_one_epoch(tiny_store):
    """The training loop takes exactly len(loader) batches and stops; the next epoch runs on
    the same DALI pipeline (no rebuild, no reader restart) and equals a fresh loader's."""
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    loader = make_loader(path, cfg, batch_size=4, py_workers=0, num_threads=1)
    n = len(loader)
    it = iter(loader)
    for _ in range(n):
        next(it)
    assert loader.position == (1, 0)
    dali_iterator = loader._iterator
    loader.set_epoch(1)                                  # what pretrain does: a no-op now
    second = [{k: v.clone() for k, v in b.items()} for b in loader]
    assert loader._iterator is dali_iterator and loader._built_at == (0, 0)
    assert len(second) == n and loader.position == (2, 0)
    fresh = list(make_loader(path, cfg, batch_size=4, py_workers=0, num_threads=1, epoch=1))
    for a, b in zip(second, fresh):
        assert torch.equal(a["z"], b["z"]) and torch.equal(a["masked"], b["masked"])


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_parallel_workers_give_the_same_batches(tiny_store, monkeypatch, start_method):
    # spawn is what the GPU path uses (CUDA forbids fork); the source must pickle
    from nvidia.dali import backend

    from tcsmae.pipelines import loader as loader_module

    if start_method == "fork" and backend.IsDriverInitialized():
        # on a GPU machine the test session has initialised CUDA (the gpu marker's check);
        # DALI then refuses fork, and the loader itself picks spawn (_start_method)
        assert loader_module._start_method(False) == "spawn"
        pytest.skip("fork after CUDA initialisation is refused by DALI (GPU machines only)")

    monkeypatch.setattr(loader_module, "_start_method", lambda gpu: start_method)
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    serial = _collect(make_loader(path, cfg, batch_size=6, py_workers=0, num_threads=1), 4)
    loader = make_loader(path, cfg, batch_size=6, py_workers=2, num_threads=2)
    parallel = _collect(loader, 2)
    # a Ctrl-C reaches the readers too (one process group): they ignore it, the batches go on
    readers = _child_pids()
    assert len(readers) >= 2
    for pid in readers:
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert set(readers) <= set(_child_pids())  # still alive
    parallel += _collect(loader, 2)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["z"], b["z"]) and torch.equal(a["masked"], b["masked"])


def _child_pids() -> list[int]:
    """Live (not zombie) child processes of this one, from /proc."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("with_labels", [False, True])
def test_stacked_and_per_sample_loaders_agree(tiny_store, with_labels):
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    a = _collect(make_loader(path, cfg, batch_size=4, py_workers=0, stacked=True,
                             with_labels=with_labels), 3)
    b = _collect(make_loader(path, cfg, batch_size=4, py_workers=0, stacked=False,
                             with_labels=with_labels), 3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].shape == y[key].shape, key
            assert torch.equal(x[key], y[key]), key


def test_loader_keys_shapes_and_dtypes(tiny_store):
    path, _ = tiny_store
    loader = make_loader(path, PipelineConfig(size=32, dtype="bfloat16"), batch_size=4,
                         py_workers=0, with_labels=True)
    batch = next(iter(loader))
    assert batch["original"].shape == (4, 3, 32, 32) and batch["original"].dtype == torch.bfloat16
    assert batch["masked"].dtype == torch.bfloat16
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["mask"].dtype == torch.float32
    assert batch["case_index"].shape == (4,) and batch["case_index"].dtype == torch.int64
    assert batch["z"].dtype == torch.int64
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == torch.int64
    # fine-tuning: masking is off
    assert torch.equal(batch["masked"], batch["original"]) and bool((batch["mask"] == 1).all())


def test_loader_refuses_mixed_grids_without_resize(tiny_store):
    path, _ = tiny_store
    with pytest.raises(UserError, match="different grids"):
        make_loader(path, PipelineConfig(size=0), batch_size=4, py_workers=0)


def test_set_epoch_restarts_at_that_epoch(tiny_store):
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    a = make_loader(path, cfg, batch_size=6, py_workers=0, num_threads=1)
    a.set_epoch(3)
    first = next(iter(a))
    b = make_loader(path, cfg, batch_size=6, epoch=3, py_workers=0, num_threads=1)
    assert torch.equal(first["z"], next(iter(b))["z"])


def test_case_filter_keeps_only_chosen_cases_and_skips_unlabelled_others(tiny_store, tmp_path):
    path, _ = tiny_store
    store = open_store(path)
    chosen = store.case_ids[:1]
    src = SliceSource(path, PipelineConfig(size=32), 2, case_ids=chosen)
    ids = np.concatenate([src.batch_ids(0, s) for s in range(src.n_batches)])
    assert set(store.slice_case[ids]) == {0}
    assert len(src.eligible) == int((store.slice_case == 0).sum())
    with pytest.raises(UserError, match="no case"):
        SliceSource(path, PipelineConfig(size=32), 2, case_ids=["not-a-case"])
    # a store where one case has no labels: with_labels works for the labelled ones only
    from tcsmae.store.writer import StoreWriter

    mixed = tmp_path / "mixed.zarr"
    hu = np.full((6, 16, 16), 40.0)
    with StoreWriter(mixed) as w:
        w.write_case("lab", hu, {"source_sha256": "a"}, labels=np.ones((6, 16, 16), np.uint8))
        w.write_case("unlab", hu, {"source_sha256": "b"})
    with pytest.raises(UserError, match="without labels"):
        SliceSource(mixed, PipelineConfig(size=32), 2, with_labels=True)
    only = SliceSource(mixed, PipelineConfig(size=32), 2, with_labels=True, case_ids=["lab"])
    assert only.n_batches == 3


def test_empty_store_says_it_holds_no_cases(tmp_path):
    from tcsmae.store.writer import StoreWriter

    with StoreWriter(tmp_path / "empty.zarr"):
        pass
    with pytest.raises(UserError, match="holds no cases"):
        SliceSource(tmp_path / "empty.zarr", PipelineConfig(size=32), 2)


@pytest.mark.parametrize("py_workers", [0, 1])
def test_a_damaged_store_gives_the_readers_one_line_error(tiny_store, tmp_path, py_workers):
    """In reader processes too (DALI wraps their exceptions in its own, with the traceback)."""
    import shutil

    path = tmp_path / "damaged.zarr"
    shutil.copytree(tiny_store[0], path)
    for shard in (path / "images").glob("*/c/0/0/0"):
        data = bytearray(shard.read_bytes())
        data[-6] ^= 0xFF  # inside the shard index, which carries a crc32c
        shard.write_bytes(bytes(data))
    loader = make_loader(path, PipelineConfig(size=32), batch_size=4, py_workers=py_workers, num_threads=1)
    with pytest.raises(UserError, match=r"unreadable .*--overwrite") as caught:
        _collect(loader, 1)
    assert "Traceback" not in str(caught.value)


def test_int16_cases_travel_as_int16_and_arrive_as_the_same_hu(tiny_store, monkeypatch):
    """All-int16 cases ("a" and "c") travel as int16; mixing in float32 case "b" falls back to
    float32. The batches are bit-equal to float32 transport either way (widening is exact)."""
    path, _ = tiny_store
    cfg = PipelineConfig(size=32)
    int16_only = SliceSource(path, cfg, 4, case_ids=["a", "c"])
    assert int16_only.hu_dtype == np.int16
    assert all(h.dtype == np.int16 for h in int16_only(_Info(0, 0))[0])
    assert SliceSource(path, cfg, 4).hu_dtype == np.float32                       # "b" is float32
    assert SliceSource(path, PipelineConfig(size=32, pad_hu=-1024.5), 4, case_ids=["a", "c"]
                       ).hu_dtype == np.float32                                   # air not int16

    def batches():
        loader = make_loader(path, cfg, 4, case_ids=["a", "c"], py_workers=0)
        return [next(iter(loader)) for _ in range(1)] + list(loader)

    narrow = batches()
    monkeypatch.setattr(SliceSource, "_transport_dtype", lambda self: np.dtype(np.float32))
    wide = batches()
    assert len(narrow) == len(wide) > 1
    for a, b in zip(narrow, wide):
        for key in ("original", "masked", "mask", "case_index", "z"):
            assert torch.equal(a[key], b[key]), key


def test_the_parallel_source_reads_one_batch_ahead_per_reader_process():
    from tcsmae.pipelines.loader import source_queue_depth

    assert [source_queue_depth(w) for w in (0, 1, 2, 4, 8)] == [2, 2, 2, 4, 8]


def test_a_full_shared_memory_is_a_user_error_with_the_fix():
    from tcsmae.pipelines.loader import _readers_user_errors

    with pytest.raises(UserError, match=r"/dev/shm.*--shm-size.*--ipc=host"):
        with _readers_user_errors():
            raise RuntimeError("Worker data receiving interrupted")
    with pytest.raises(RuntimeError, match="something else"):  # other failures pass unchanged
        with _readers_user_errors():
            raise RuntimeError("something else")
