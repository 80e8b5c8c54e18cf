"""Losses against independent references: a Python loop over method-notes' NT-Xent formula,
scikit-image's SSIM, and the weighted sum of Eq. 18."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tcsmae.pretrain.config import LossConfig
from tcsmae.pretrain.losses import (
    LearnableTemperature,
    cosine_embedding_variant,
    nt_xent,
    pretraining_loss,
    reconstruction_loss,
    ssim_per_image,
)


def nt_xent_loop(zm: np.ndarray, zo: np.ndarray, t: float) -> float:
    """method-notes, literally: z = normalise([P_m; P_o]); s_ij = z_i.z_j / T; p(i) = i +- N;
    loss = mean_i -log(exp(s_i,p(i)) / sum_{k != i} exp(s_ik))."""
    z = [np.asarray(v, dtype=np.float64) for v in list(zm) + list(zo)]
    z = [v / math.sqrt(sum(x * x for x in v)) for v in z]
    n2, n = len(z), len(zm)
    total = 0.0
    for i in range(n2):
        s = [float(np.dot(z[i], z[k])) / t for k in range(n2)]
        p = i + n if i < n else i - n
        denom = sum(math.exp(s[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(s[p]) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,t", [(1, 4, 0.5), (4, 8, 0.07), (7, 128, 0.2)])
def test_nt_xent_matches_python_loop(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    zm, zo = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = nt_xent(zm, zo, t).item()
    want = nt_xent_loop(zm.numpy(), zo.numpy(), t)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_nt_xent_anchor_subsets_average_to_the_full_loss():
    g = torch.Generator().manual_seed(3)
    zm, zo = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    full = nt_xent(zm, zo, 0.1)
    halves = [nt_xent(zm, zo, 0.1, anchors=torch.tensor(a)) for a in ([0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11])]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)


def test_nt_xent_prefers_aligned_views():
    g = torch.Generator().manual_seed(5)
    zm = torch.randn(8, 32, generator=g)
    aligned = nt_xent(zm, zm + 0.01 * torch.randn(8, 32, generator=g), 0.1)
    shuffled = nt_xent(zm, zm[torch.randperm(8, generator=g)], 0.1)
    assert aligned < shuffled


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    base = rng.random((2, 3, 48, 40))
    a = np.clip(base + 0.1 * rng.standard_normal(base.shape), 0, 1)
    b = np.clip(base + 0.2 * rng.standard_normal(base.shape), 0, 1)
    got = ssim_per_image(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
    want = [
        structural_similarity(a[i], b[i], channel_axis=0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for i in range(2)
    ]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_reconstruction_loss_compares_both_branches_with_the_original():
    rng = np.random.default_rng(1)
    original = torch.from_numpy(rng.random((2, 3, 32, 32))).float()
    noisy = (original + 0.3 * torch.from_numpy(rng.standard_normal((2, 3, 32, 32))).float()).clamp(0, 1)
    assert reconstruction_loss(original, original, original).item() == pytest.approx(0.0, abs=1e-6)
    one = reconstruction_loss(noisy, original, original).item()
    two = reconstruction_loss(noisy, noisy, original).item()
    assert one > 0.05
    assert two == pytest.approx(2 * one, rel=1e-6)


def test_temperature_gets_gradient_and_the_floor_holds():
    temp = LearnableTemperature(init=0.07, floor=0.01)
    assert temp().item() == pytest.approx(0.07, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    zm, zo = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    nt_xent(zm, zo, temp()).backward()
    grad = temp.log_inv_temperature.grad
    assert grad is not None and grad.abs().item() > 0
    with torch.no_grad():
        temp.log_inv_temperature.fill_(math.log(1 / 0.001))  # T would be 0.001
    assert temp().item() == pytest.approx(0.01, rel=1e-6)
    temp.clamp_()
    assert temp.log_inv_temperature.item() == pytest.approx(math.log(100.0), rel=1e-6)


def test_total_is_ssim_plus_weighted_contrastive_sum_over_levels():
    g = torch.Generator().manual_seed(2)
    original = torch.rand(3, 3, 32, 32, generator=g)
    r_m, r_o = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    pm = [torch.randn(3, 16, generator=g) for _ in range(2)]
    po = [torch.randn(3, 16, generator=g) for _ in range(2)]
    t = torch.tensor(0.2)
    cfg = LossConfig(weight=0.3)
    terms = pretraining_loss(r_m, r_o, original, pm, po, t, cfg)
    con = nt_xent(pm[0], po[0], t) + nt_xent(pm[1], po[1], t)
    torch.testing.assert_close(terms.loss_con, con)
    torch.testing.assert_close(terms.loss_ssim, reconstruction_loss(r_m, r_o, original))
    torch.testing.assert_close(terms.loss, terms.loss_ssim + 0.3 * con)
    assert terms.loss.dtype == torch.float32


def test_losses_are_float32_from_bfloat16_inputs():
    g = torch.Generator().manual_seed(4)
    original = torch.rand(2, 3, 32, 32, generator=g)
    r = original.to(torch.bfloat16)
    p = [torch.randn(2, 8, generator=g).to(torch.bfloat16)]
    terms = pretraining_loss(r, r, original, p, p, torch.tensor(0.1), LossConfig())
    assert terms.loss_ssim.dtype == terms.loss_con.dtype == torch.float32


def test_cosine_variant_is_scaled_one_minus_cosine():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    want = 1000 * (1 - torch.nn.functional.cosine_similarity(a, b)).mean()
    torch.testing.assert_close(cosine_embedding_variant(a, b), want)
    terms = pretraining_loss(torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32),
                             [a], [b], None, LossConfig(contrastive="cosine", cosine_scale=1000.0))
    torch.testing.assert_close(terms.loss_con, want)


def test_masked_branch_only_is_the_masked_term_against_the_original():
    """MAE/AE objectives (no unmasked branch): L_ssim = mean_n (1 - SSIM(R_m, I_o)), and the
    criterion takes the PretrainOutput with recon_original None."""
    from tcsmae.pretrain.losses import PretrainingLoss
    from tcsmae.pretrain.model import PretrainOutput

    rng = np.random.default_rng(7)
    original = torch.from_numpy(rng.random((2, 3, 32, 32))).float()
    r_m = torch.from_numpy(rng.random((2, 3, 32, 32))).float().requires_grad_(True)
    want = np.mean([1 - structural_similarity(r_m[i].detach().numpy(), original[i].numpy(), channel_axis=0,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0) for i in range(2)])
    assert reconstruction_loss(r_m, None, original).item() == pytest.approx(want, abs=1e-6)
    terms = PretrainingLoss(LossConfig())(PretrainOutput(r_m, None, [], [], None), original)
    assert terms.loss.item() == pytest.approx(want, abs=1e-6) and terms.loss_con.item() == 0.0
    terms.loss.backward()
    assert r_m.grad is not None and r_m.grad.abs().sum() > 0
