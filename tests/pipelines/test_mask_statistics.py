"""Tissue-mask draws over many samples: count, uniformity, independence, reproducibility."""

from __future__ import annotations

import numpy as np
from scipy import stats

from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.source import draw_mask

N = 4000


def _draws(cfg: PipelineConfig, epoch: int = 0) -> np.ndarray:
    return np.stack([draw_mask(cfg, epoch, sid, (cfg.size, cfg.size)) for sid in range(N)])


def test_exactly_floor_rho_k_distinct_intervals():
    for rho, k in [(0.75, 8), (0.35, 8), (0.5, 6)]:
        cfg = PipelineConfig(rho=rho, intervals=k)
        draws = _draws(cfg)
        assert draws.shape == (N, k) and set(np.unique(draws)) <= {0, 1}
        assert (draws.sum(axis=1) == int(np.floor(rho * k))).all()


def test_intervals_chosen_uniformly():
    draws = _draws(PipelineConfig())
    counts = draws.sum(axis=0)                                 # per interval, expected N * 6/8
    assert stats.chisquare(counts).pvalue > 1e-3
    # also the complement: which 2 of 8 stay visible, over all 28 pairs
    kept = [tuple(np.flatnonzero(d == 0)) for d in draws]
    pairs = np.unique(kept, axis=0, return_counts=True)[1]
    assert len(pairs) == 28 and stats.chisquare(pairs).pvalue > 1e-3


def test_draws_independent_across_samples_and_epochs():
    draws = _draws(PipelineConfig()).astype(float)
    # neighbouring slice ids: per-interval correlation ~ N(0, 1/sqrt(N)) when independent
    for j in range(8):
        r = np.corrcoef(draws[:-1, j], draws[1:, j])[0, 1]
        assert abs(r) < 0.07
    other_epoch = _draws(PipelineConfig(), epoch=1).astype(float)
    agree = (draws == other_epoch).all(axis=1).mean()
    assert abs(agree - 1 / 28) < 0.02                         # chance of the same 2 kept


def test_draws_reproducible_from_seed():
    a = _draws(PipelineConfig(seed=5))
    b = _draws(PipelineConfig(seed=5))
    c = _draws(PipelineConfig(seed=6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_patch_draws_ratio_and_shape():
    cfg = PipelineConfig(masking="patch", size=64, patch_size=16)
    grids = np.stack([draw_mask(cfg, 0, sid, (64, 64)) for sid in range(200)])
    assert grids.shape == (200, 4, 4) and (grids.sum(axis=(1, 2)) == 12).all()
    assert stats.chisquare(grids.sum(axis=0).ravel()).pvalue > 1e-3


def test_no_masking_draws_nothing():
    cfg = PipelineConfig(masking="none")
    assert not draw_mask(cfg, 0, 3, (256, 256)).any()
