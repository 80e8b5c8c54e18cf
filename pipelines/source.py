"""Zarr slice source for `fn.external_source(batch=True, batch_info=True, parallel=...)`.

One call returns one batch for this rank: per sample the HU slice (int16 when every
eligible case is int16, else float32), its mask draw, case index and z, and optionally an
affine and labels; in stacked mode each output is one array for the whole batch. Epochs are
shuffled by (seed, epoch) and dealt round-robin to the ranks, each with exactly n_batches
batches; a resume at (epoch, step) sees the same batches and masks. Outputs, stacked mode,
sharding and resume rules: docs/pipelines.md, "The slice source".
"""

from __future__ import annotations

import copy
import math

import numpy as np

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.masking import (
    STREAM_AFFINE,
    STREAM_MASK,
    draw_intervals,
    draw_patches,
    patch_grid_shape,
    sample_rng,
)
from tcsmae.pipelines.resize import pad_to_square
from tcsmae.store.reader import open_store

LABEL_MAX = np.iinfo(np.int16).max


def epoch_order(eligible: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Shuffled slice ids of one epoch: eligible (S',) int64 -> (S',) int64 permutation."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    return eligible[rng.permutation(len(eligible))]


def rank_slices(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's slice ids of an epoch: (n_batches * batch_size,) int64, batch-major."""
    n_batches = len(order) // (batch_size * world_size)
    used = order[: n_batches * batch_size * world_size]
    return used[rank::world_size]


def draw_mask(cfg: PipelineConfig, epoch: int, slice_id: int, shape: tuple[int, int]
              ) -> np.ndarray:
    """The per-sample mask draw: (K,) uint8 chosen intervals (tissue; zeros for 'none') or
    (GY, GX) uint8 masked patches (patch); shape (Y, X) of the output grid."""
    rng = sample_rng(cfg.seed, epoch, slice_id, STREAM_MASK)
    if cfg.masking == "tissue":
        return draw_intervals(rng, cfg.intervals, cfg.n_masked_intervals)
    if cfg.masking == "patch":
        return draw_patches(rng, patch_grid_shape(shape, cfg.patch_size), cfg.patch_ratio)
    return np.zeros(cfg.intervals, dtype=np.uint8)


def draw_affine(cfg: PipelineConfig, epoch: int, slice_id: int, side: int) -> np.ndarray:
    """Random affine about the image centre as a (2, 3) float32 destination-to-source matrix.

    Forward map: rotate by theta, scale by s, shift by t (pixels); its inverse is returned
    (DALI warp_affine's default convention; coordinates of pixel corners, x then y).
    """
    rng = sample_rng(cfg.seed, epoch, slice_id, STREAM_AFFINE)
    theta = math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(-cfg.translation, cfg.translation, size=2) * side
    c, s = math.cos(theta), math.sin(theta)
    inverse = np.array([[c, s], [-s, c]]) / scale                  # (R(theta) * scale)^-1
    centre = np.array([side / 2.0, side / 2.0])
    offset = centre - inverse @ (centre + shift)
    return np.concatenate([inverse, offset[:, None]], axis=1).astype(np.float32)


class SliceSource:
    """Batch callable for DALI's external_source; picklable (store reopened per process).

    store_path: a tcsmae store (tcsmae.store). batch_size: per rank.
    epoch, step: where to start (resume). with_labels: also emit label slices.
    stacked: None = whenever possible (docs/pipelines.md, "Stacked mode"), True = required,
        False = never.
    case_ids: only these cases' slices (e.g. a fine-tuning fold); None = every case.
    """

    def __init__(self, store_path, cfg: PipelineConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, step: int = 0, with_labels: bool = False,
                 stacked: bool | None = None, case_ids: list[str] | None = None):

        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.store = open_store(store_path)
        if self.store.n_slices == 0:
            raise UserError(f"{store_path} holds no cases yet (every conversion into it failed or "
                            f"none finished); `tcsmae info {store_path}` shows it, convert data into it first")
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_epoch, self.start_step = int(epoch), int(step)
        self.with_labels = bool(with_labels)
        keep = self.store.body_fraction >= cfg.body_fraction_min
        if case_ids is None:
            cases = list(self.store.case_ids)
        else:
            unknown = [c for c in case_ids if c not in self.store.case_ids]
            if unknown:
                raise UserError(f"{store_path}: no case(s) {unknown[:5]}; `tcsmae info {store_path}` "
                                "lists the cases")
            cases = list(case_ids)
            wanted = [self.store.case_ids.index(c) for c in cases]
            keep &= np.isin(self.store.slice_case, wanted)
        self.eligible = np.flatnonzero(keep).astype(np.int64)
        self.n_batches = len(self.eligible) // (self.batch_size * self.world_size)
        if self.n_batches == 0:
            raise UserError(
                f"{store_path}: {len(self.eligible)} slices of {len(cases)} case(s) pass "
                f"body_fraction_min={cfg.body_fraction_min}, fewer than one batch of "
                f"{self.batch_size} per rank x {self.world_size} ranks; lower the batch size or "
                "the filter")
        if not 0 <= self.start_step < self.n_batches:
            raise UserError(f"resume step {step} must lie in [0, {self.n_batches}) batches/epoch")
        if with_labels:
            missing = [c for c in cases if not self.store.has_labels(c)]
            if missing:
                raise UserError(f"{store_path}: cases without labels {missing[:5]}; fine-tuning "
                                "needs a store whose cases all have label maps")
        self._order_cache: tuple[int, np.ndarray] | None = None
        uniform = len(self._output_grids()) == 1
        if stacked and (cfg.augment or not uniform):
            raise UserError(f"{store_path}: stacked batches need one slice grid for all cases "
                            "and no augmentation; use stacked=None to fall back")
        self.stacked = bool(uniform and not cfg.augment) if stacked is None else bool(stacked)
        self.hu_dtype = self._transport_dtype()

    def _transport_dtype(self) -> np.dtype:
        """int16 when every eligible case is stored as int16 and the padding air fits it
        (the HU then travel as stored), else float32."""
        cases = np.unique(self.store.slice_case[self.eligible])
        stored = {self.store.image_dtype(self.store.case_ids[int(c)]) for c in cases}
        pad = self.cfg.pad_hu
        if stored == {np.dtype(np.int16)} and float(pad).is_integer() and -32768 <= pad <= 32767:
            return np.dtype(np.int16)
        return np.dtype(np.float32)

    def _output_grids(self) -> set[tuple[int, int]]:
        """Grids (Y, X) the eligible slices have after padding."""
        cases = np.unique(self.store.slice_case[self.eligible])
        grids = set()
        for c in cases:
            y, x = self.store.image(self.store.case_ids[int(c)]).shape[1:]
            grids.add((max(y, x),) * 2 if self.cfg.size > 0 else (y, x))
        return grids

    def at(self, epoch: int, step: int) -> "SliceSource":
        """A copy of this source that starts at batch `step` of `epoch`."""
        if not 0 <= step < self.n_batches:
            raise UserError(f"resume step {step} must lie in [0, {self.n_batches}) batches/epoch")
        other = copy.copy(self)
        other.start_epoch, other.start_step, other._order_cache = int(epoch), int(step), None
        return other

    @property
    def num_outputs(self) -> int:
        return 4 + int(self.cfg.augment) + int(self.with_labels)

    @property
    def output_names(self) -> list[str]:
        names = ["hu", "draw", "case_index", "z"]
        if self.cfg.augment:
            names.append("affine")
        if self.with_labels:
            names.append("label")
        return names

    def epoch_slices(self, epoch: int) -> np.ndarray:
        """This rank's slice ids of `epoch`, (n_batches * batch_size,) int64."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = epoch_order(self.eligible, self.cfg.seed, epoch)
            self._order_cache = (epoch, rank_slices(order, self.batch_size, self.rank,
                                                    self.world_size))
        return self._order_cache[1]

    def batch_ids(self, epoch: int, step: int) -> np.ndarray:
        """Slice ids of batch `step` of `epoch` for this rank, (batch_size,) int64."""
        ids = self.epoch_slices(epoch)
        return ids[step * self.batch_size:(step + 1) * self.batch_size]

    def read_sample(self, slice_id: int, epoch: int) -> list[np.ndarray]:
        """All outputs of one sample (order of `output_names`)."""
        cfg = self.cfg
        case, z = int(self.store.slice_case[slice_id]), int(self.store.slice_z[slice_id])
        hu = self.store.read_stored_slice(case, z)
        if cfg.size > 0:
            hu = pad_to_square(hu, cfg.pad_hu)
        out_shape = (cfg.size, cfg.size) if cfg.size > 0 else hu.shape
        sample = [np.ascontiguousarray(hu, dtype=self.hu_dtype),
                  draw_mask(cfg, epoch, slice_id, out_shape),
                  np.array([case], dtype=np.int64), np.array([z], dtype=np.int64)]
        if cfg.augment:
            sample.append(draw_affine(cfg, epoch, slice_id, hu.shape[0]))
        if self.with_labels:
            label = self.store.read_label_slice(case, z)
            if label.min() < 0 or label.max() > LABEL_MAX:
                raise UserError(f"{self.store.path}: case {self.store.case_ids[case]!r} has "
                                f"label ids outside [0, {LABEL_MAX}]")
            if cfg.size > 0:
                label = pad_to_square(label, 0)
            sample.append(np.ascontiguousarray(label, dtype=np.int16))
        return sample

    def epoch_and_step(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        """DALI's (epoch_idx, iteration) since the pipeline was built -> (epoch, step)."""
        step = iteration + (self.start_step if epoch_idx == 0 else 0)
        return self.start_epoch + epoch_idx, step

    def __call__(self, batch_info) -> list[list[np.ndarray]]:
        epoch, step = self.epoch_and_step(batch_info.epoch_idx, batch_info.iteration)
        if step >= self.n_batches:
            raise StopIteration
        samples = [self.read_sample(int(i), epoch) for i in self.batch_ids(epoch, step)]
        if self.stacked:
            return [[np.stack(column)] for column in zip(*samples)]
        return [list(column) for column in zip(*samples)]
