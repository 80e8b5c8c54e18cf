"""TCS-MAE losses (paper Eq. 13-18, as docs/method.md pins them down).

Pure functions do the arithmetic and the thin modules only hold options (smp's style):
`reconstruction_loss` (Eq. 14: both branches against the ORIGINAL; the masked branch alone
for MAE/AE), `nt_xent` / `global_nt_xent` (Eq. 17 read as SimCLR's symmetric NT-Xent, with
negatives from every DDP rank), `cosine_embedding_variant` (the authors' public code) and
`pretraining_loss` (Eq. 18). All compute in float32 outside autocast: pytorch-msssim's SSIM
in bf16 loses about 3e-4, the size of late-training improvements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _msssim_ssim
from torch import Tensor, nn

from tcsmae.pretrain.config import LossConfig


def _fp32(x: Tensor) -> Tensor:
    return x.float().contiguous()


def ssim_per_image(
    recon: Tensor,
    target: Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """SSIM of each image, averaged over channels and the valid (unpadded) window positions.

    recon, target: (N, C, H, W) float in 0..1 (data_range 1.0). Returns (N,) float32.
    Gaussian window `window_size` x `window_size`, std `sigma` pixels (pytorch-msssim).
    """
    with torch.autocast(device_type=recon.device.type, enabled=False):
        return _msssim_ssim(
            _fp32(recon), _fp32(target), data_range=1.0, size_average=False,
            win_size=window_size, win_sigma=sigma, K=(k1, k2),
        )


def ssim_loss(recon: Tensor, target: Tensor, **ssim_options) -> Tensor:
    """mean_n (1 - SSIM(recon_n, target_n)); shapes as `ssim_per_image`. Scalar float32."""
    return (1.0 - ssim_per_image(recon, target, **ssim_options)).mean()


def reconstruction_loss(
    recon_masked: Tensor, recon_original: Tensor | None, original: Tensor, **ssim_options
) -> Tensor:
    """Eq. 14: mean_n [(1 - SSIM(R_m, I_o)) + (1 - SSIM(R_o, I_o))].

    Both reconstructions are compared with the original image I_o (never the masked one).
    All three: (N, 3, H, W) float in 0..1. recon_original None (objectives without the
    unmasked branch: MAE, AE): mean_n (1 - SSIM(R_m, I_o)) alone. Scalar float32.
    """
    loss = ssim_loss(recon_masked, original, **ssim_options)
    if recon_original is not None:
        loss = loss + ssim_loss(recon_original, original, **ssim_options)
    return loss


def nt_xent(
    z_masked: Tensor, z_original: Tensor, temperature: Tensor | float, anchors: Tensor | None = None
) -> Tensor:
    """SimCLR's symmetric NT-Xent over 2N anchors, exactly as in method-notes.

    z = normalise([z_masked; z_original]) is (2N, D); s_ij = z_i . z_j / T. The positive of
    anchor i is the other view of the same slice, p(i) = (i + N) mod 2N, and
        loss = mean_i -log( exp(s_i,p(i)) / sum_{k != i} exp(s_ik) )
    (the positive stays in the denominator, self-similarity does not).

    z_masked, z_original: (N, D) projections of the same N slices, any float dtype.
    temperature: scalar (tensor to learn it). anchors: optional (A,) int64 indices into
    0..2N-1 to average over only those anchors (used per DDP rank); default all 2N.
    Returns a scalar float32.
    """
    with torch.autocast(device_type=z_masked.device.type, enabled=False):
        n = z_masked.shape[0]
        z = F.normalize(torch.cat([_fp32(z_masked), _fp32(z_original)]), dim=1)  # (2N, D)
        if anchors is None:
            anchors = torch.arange(2 * n, device=z.device)
        logits = z[anchors] @ z.T / temperature  # (A, 2N)
        self_mask = F.one_hot(anchors, 2 * n).bool()  # (A, 2N)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = (anchors + n) % (2 * n)  # (A,)
        return F.cross_entropy(logits, positives)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate x (n, D) from every rank along dim 0 -> (world * n, D), rank order.

    Uses torch.distributed.nn's all_gather, whose backward sends each rank the gradient of
    its own rows summed over all ranks, so the negatives of the global batch train every
    rank's encoder. Without an initialised process group (one process), returns x.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its suggested successor lives in a private module whose names
        warnings.simplefilter("ignore", FutureWarning)  # still change between releases
        return torch.cat(all_gather(x.contiguous()), dim=0)


def global_nt_xent(z_masked: Tensor, z_original: Tensor, temperature: Tensor | float) -> Tensor:
    """NT-Xent with negatives from the global batch (all DDP ranks); one process = nt_xent.

    z_masked, z_original: (n, D) of this rank's n slices; every rank must hold the same n.
    Each rank averages over its own 2n anchors against all 2N = 2 * world * n candidates;
    DDP's gradient averaging then gives exactly the gradient of the global-batch loss.
    Returns this rank's scalar float32 (the mean over ranks is the global loss).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return nt_xent(z_masked, z_original, temperature)
    rank, world, n = dist.get_rank(), dist.get_world_size(), z_masked.shape[0]
    all_masked = gather_with_grad(z_masked)  # (N, D), N = world * n
    all_original = gather_with_grad(z_original)
    assert all_masked.shape[0] == world * n, "every rank needs the same batch size"
    mine = torch.arange(rank * n, (rank + 1) * n, device=z_masked.device)
    anchors = torch.cat([mine, mine + world * n])  # this rank's masked and original rows
    return nt_xent(all_masked, all_original, temperature, anchors=anchors)


def cosine_embedding_variant(p_masked: Tensor, p_original: Tensor, scale: float = 1000.0) -> Tensor:
    """The authors' public code: scale * cosine_embedding_loss(p_m, p_o, target=+1).

    p_masked, p_original: (N, D) max-pooled heads. Equals scale * mean_n (1 - cos(p_m, p_o)):
    no negatives and no temperature. Scalar float32.
    """
    with torch.autocast(device_type=p_masked.device.type, enabled=False):
        target = torch.ones(p_masked.shape[0], device=p_masked.device)
        return scale * F.cosine_embedding_loss(_fp32(p_masked), _fp32(p_original), target)


class LearnableTemperature(nn.Module):
    """One learnable NT-Xent temperature, stored CLIP-style as log(1/T).

    Init T = `init`; forward returns T = max(exp(-log_inv_temperature), floor) as a float32
    scalar tensor, so the floor holds inside every loss; `clamp_()` after each optimiser
    step keeps the parameter itself at the floor so it can move back up at once.
    """

    def __init__(self, init: float = 0.07, floor: float = 0.01):
        super().__init__()
        self.floor = floor
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1.0 / init)))

    def forward(self) -> Tensor:
        return torch.exp(-self.log_inv_temperature.float()).clamp(min=self.floor)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_inv_temperature.clamp_(max=math.log(1.0 / self.floor))


@dataclass
class LossTerms:
    """Scalar float32 tensors: loss = loss_ssim + weight * loss_con."""

    loss: Tensor
    loss_ssim: Tensor
    loss_con: Tensor


def pretraining_loss(
    recon_masked: Tensor,
    recon_original: Tensor | None,
    original: Tensor,
    proj_masked: list[Tensor],
    proj_original: list[Tensor],
    temperature: Tensor | None,
    cfg: LossConfig,
) -> LossTerms:
    """Eq. 18: L = L_ssim + lambda * L_con, L_con summed over the chosen encoder levels.

    recon_*: (N, 3, H, W) reconstructions in 0..1 (recon_original None: masked branch only);
    original: (N, 3, H, W) in 0..1.
    proj_*: one (N, D) projection per MEP level (empty list = 'Scales 0', no L_con).
    temperature: scalar tensor (NT-Xent) or None (cosine variant / no levels).
    """
    ssim_options = dict(window_size=cfg.ssim_window, sigma=cfg.ssim_sigma, k1=cfg.ssim_k1, k2=cfg.ssim_k2)
    loss_ssim = reconstruction_loss(recon_masked, recon_original, original, **ssim_options)
    loss_con = torch.zeros((), device=original.device)
    for p_m, p_o in zip(proj_masked, proj_original, strict=True):
        if cfg.contrastive == "ntxent":
            loss_con = loss_con + global_nt_xent(p_m, p_o, temperature)
        else:
            loss_con = loss_con + cosine_embedding_variant(p_m, p_o, cfg.cosine_scale)
    return LossTerms(loss=loss_ssim + cfg.weight * loss_con, loss_ssim=loss_ssim, loss_con=loss_con)


class PretrainingLoss(nn.Module):
    """Thin module around `pretraining_loss`: holds the LossConfig only (no parameters;
    the learnable temperature lives in the model, so DDP averages its gradient)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, out, original: Tensor) -> LossTerms:
        """out: a `tcsmae.pretrain.model.PretrainOutput`; original: (N, 3, H, W) in 0..1."""
        return pretraining_loss(
            out.recon_masked, out.recon_original, original,
            out.proj_masked, out.proj_original, out.temperature, self.cfg,
        )
