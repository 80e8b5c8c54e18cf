"""Every default that ../shared/reference/method-notes.md pins, read back from the code.

The other tests pass most of these numbers explicitly; this file fails if a default drifts
from the method (a changed window, K, temperature floor, fine-tuning rate...).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.config import PipelineConfig
from tcsmae.finetune.config import FinetuneConfig
from tcsmae.finetune.fold import make_loss
from tcsmae.pretrain.config import LossConfig, TrainConfig, load_config_file, preset


def test_input_image_and_tissue_mask_defaults():
    p = PipelineConfig()
    assert p.lung_window == (-500.0, 1200.0) and p.mediastinal_window == (30.0, 300.0)  # Eq. 5
    assert p.edge_scaling == "clip" and p.edge_clip == 1.0  # fixed, never per image
    assert p.hu_range == (-1000.0, 500.0) and p.intervals == 8 and p.rho == 0.75
    assert p.n_masked_intervals == 6 and p.masking == "tissue"
    assert p.pad_hu == -1024.0 and p.size == 256 and p.dtype == "float32"
    assert (p.patch_size, p.patch_ratio) == (16, 0.75)  # MAE baseline
    assert not p.augment  # RandomAffine offered, off by default
    assert (p.rotation_deg, p.translation, p.scale_range) == (20.0, 0.05, (0.9, 1.1))
    # the paper's best rho for pneumonia: floor(0.35 * 8) = 2 intervals
    assert PipelineConfig(rho=0.35).n_masked_intervals == 2


def test_loss_and_optimisation_defaults():
    loss = LossConfig()
    assert loss.contrastive == "ntxent" and loss.weight == 1.0  # Eq. 18, lambda = 1
    assert (loss.temperature_init, loss.temperature_floor, loss.learn_temperature) == (0.07, 0.01, True)
    assert (loss.ssim_window, loss.ssim_sigma, loss.ssim_k1, loss.ssim_k2) == (11, 1.5, 0.01, 0.03)
    cfg = TrainConfig()
    assert cfg == preset("paper")
    assert (cfg.lr, cfg.lr_gamma, cfg.epochs, cfg.batch_size, cfg.input_size) == (1e-4, 0.96, 60, 30, 256)
    assert cfg.model.encoder == "mit_b2" and cfg.model.mep_levels == (4, 5)


def test_finetuning_defaults():
    f = FinetuneConfig()
    assert (f.lr, f.epochs, f.size, f.folds) == (1e-6, 50, 256, 5)
    assert (f.ce_weight, f.dice_weight) == (1.0, 1.0)  # cross-entropy + Dice


@pytest.mark.parametrize("file_config,expected", [({"seed": 5}, (5, 5)),
                                                   ({"seed": 5, "pipeline": {"seed": 7}}, (5, 7)),
                                                   ({"pipeline": {"seed": 7}}, (0, 7))])
def test_one_seed_in_a_config_file_seeds_init_and_masks(tmp_path, file_config, expected):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(file_config))
    cfg = load_config_file(path, preset("paper"))
    assert (cfg.seed, cfg.pipeline.seed) == expected


def _soft_dice_loss(prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - soft DSC per class over the batch, classes absent from the target count 0, mean over
    all classes (smp's DiceLoss, smooth 0). prob, onehot: (N, C, H, W) float."""
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    total = (prob + onehot).sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    return ((1 - 2 * inter / total.clamp_min(1e-7)) * present).mean()


def test_finetuning_loss_is_cross_entropy_plus_dice_by_hand():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[target == 2] = 0  # class 2 absent: it must not count
    logits = torch.randn(2, 4, 8, 8, generator=gen)
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    ce, dice = F.cross_entropy(logits, target), _soft_dice_loss(logits.softmax(1), onehot)
    for w_ce, w_dice in [(1.0, 1.0), (0.5, 2.0)]:
        got = make_loss(False, w_ce, w_dice)(logits, target)
        assert math.isclose(got.item(), (w_ce * ce + w_dice * dice).item(), rel_tol=1e-5)
    # binary: BCE + soft Dice of the foreground
    logit1 = logits[:, :1]
    fg = (target > 0).float()[:, None]
    bce = F.binary_cross_entropy_with_logits(logit1, fg)
    dice1 = _soft_dice_loss(logit1.sigmoid(), fg)
    assert math.isclose(make_loss(True, 1.0, 1.0)(logit1, (target > 0).long()).item(),
                        (bce + dice1).item(), rel_tol=1e-5)
    # a confident correct prediction scores ~0
    perfect = 40.0 * (2 * onehot - 1)
    assert make_loss(False, 1.0, 1.0)(perfect, target).item() < 1e-6
