"""The TCS-MAE network: one smp U-Net for both views plus the MEP projection heads.

Forward in named stages (MAE's style): `forward_encoder` (smp's 6 maps, F1..F5 = [1:]),
`forward_decoder` (U-Net decoder + head, sigmoid in fp32), `forward_projection` (one (B, D)
per MEP level, Eq. 16); `forward(masked, original)` runs the objective's branches, jointly
(one batch of 2N) or separately (per-view BatchNorm). The `unet` attribute is a plain
`smp.Unet(..., classes=3)` without activation, so its state dict is what `tcsmae export`
writes; flattened MEP heads tie a model to one input size (layer sizes: `TCSMAE`).
No DALI, zarr or argparse here.
"""

from __future__ import annotations

from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from tcsmae.errors import UserError
from tcsmae.pretrain.config import LossConfig, ModelConfig, TrainConfig
from tcsmae.pretrain.losses import LearnableTemperature

IN_CHANNELS = 3  # (lung, mediastinal, edge)
OUT_CHANNELS = 3  # the full 3-channel image is reconstructed


def build_unet(encoder: str, encoder_weights: str | None = None) -> smp.Unet:
    """smp.Unet(encoder, encoder_weights, in_channels=3, classes=3), no activation.

    Unknown encoder names raise UserError listing smp's encoders.
    """
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise UserError(f"encoder {encoder!r} is not an smp encoder; supported encoders: {names}")
    return smp.Unet(
        encoder_name=encoder, encoder_weights=encoder_weights,
        in_channels=IN_CHANNELS, classes=OUT_CHANNELS, activation=None,
    )


def mep_input_features(cfg: ModelConfig, input_size: int, channels: list[int] | None = None) -> list[int]:
    """Input features of each MEP head: C * (S / 2^l)^2 ('flatten') or C ('maxpool').

    channels: the encoder's out_channels [in, F1..F5] (default: smp's registry entry of
    cfg.encoder, so nothing is built). UserError for a level with 0 channels (MiT's F1).
    """
    if channels is None:
        if cfg.encoder not in smp.encoders.encoders:
            raise UserError(f"encoder {cfg.encoder!r} is not an smp encoder; supported encoders: "
                            f"{smp.encoders.get_encoder_names()}")
        channels = smp.encoders.encoders[cfg.encoder]["params"]["out_channels"]
    sizes = []
    for level in cfg.mep_levels:
        c = channels[level]
        if c == 0:
            raise UserError(
                f"MEP level F{level} of encoder {cfg.encoder!r} has 0 channels (smp's MiT has "
                "an empty F1): choose levels from F2..F5, e.g. model.mep_levels [4, 5]"
            )
        side = input_size // 2**level
        sizes.append(c * side * side if cfg.projection == "flatten" else c)
    return sizes


def mep_head_parameters(cfg: ModelConfig, input_size: int) -> int:
    """Parameters of the MEP heads of `cfg` at `input_size` px, without building the model
    (flatten heads of F4 F5 for mit_b2 at 256 px: 14,680,320)."""
    return sum((f + 1) * cfg.projection_dim for f in mep_input_features(cfg, input_size))


def describe_mep_heads(cfg: ModelConfig, input_size: int) -> str:
    """One line for the start of a run, e.g. "MEP heads: flatten of F4 F5 -> 128, 14,680,320
    parameters" (or "MEP heads: none (no contrastive term)")."""
    if not cfg.mep_levels:
        return "MEP heads: none (no contrastive term)"
    head = "flatten" if cfg.projection == "flatten" else "max-pool"
    levels = " ".join(f"F{v}" for v in cfg.mep_levels)
    return (f"MEP heads: {head} of {levels} -> {cfg.projection_dim}, "
            f"{mep_head_parameters(cfg, input_size):,} parameters")


@dataclass
class PretrainOutput:
    """What one forward of both branches returns (N slices per branch).

    recon_masked: (N, 3, H, W) float32 in 0..1 (sigmoid).
    recon_original: the same for the original view, or None when the objective reconstructs
        the masked view only (model.branches 'masked': MAE, AE).
    proj_masked, proj_original: one (N, D) tensor per MEP level, network dtype.
    temperature: float32 scalar tensor (NT-Xent), or None when there is no learnable one.
    """

    recon_masked: Tensor
    recon_original: Tensor | None
    proj_masked: list[Tensor]
    proj_original: list[Tensor]
    temperature: Tensor | None


class TCSMAE(nn.Module):
    """U-Net reconstruction network with MEP heads and the learnable NT-Xent temperature.

    cfg: the model config; input_size: training image side in pixels (multiple of 32);
    loss_cfg: decides whether a temperature is learnt (NT-Xent with at least one level).
    For mit_b2 at 256x256 the MiT encoder maps are 64@64x64 (F2), 128@32x32 (F3), 320@16x16
    (F4) and 512@8x8 (F5); F1 is smp's empty 0-channel map. Flattened MEP heads take
    C * H * W inputs, so a model is built for one input size.
    """

    def __init__(self, cfg: ModelConfig, input_size: int, loss_cfg: LossConfig | None = None):
        super().__init__()
        loss_cfg = loss_cfg or LossConfig()
        self.cfg = cfg
        self.input_size = int(input_size)
        self.unet = build_unet(cfg.encoder, cfg.encoder_weights)
        sizes = mep_input_features(cfg, self.input_size, self.unet.encoder.out_channels)
        self.projections = nn.ModuleList(nn.Linear(f, cfg.projection_dim) for f in sizes)
        self.temperature = None
        if cfg.mep_levels and loss_cfg.contrastive == "ntxent":
            self.temperature = LearnableTemperature(loss_cfg.temperature_init, loss_cfg.temperature_floor)
            self.temperature.log_inv_temperature.requires_grad_(loss_cfg.learn_temperature)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "TCSMAE":
        return cls(cfg.model, cfg.input_size, cfg.loss)

    def mep_parameter_count(self) -> int:
        """Parameters of the MEP projection heads (all levels; weights and biases)."""
        return sum(p.numel() for p in self.projections.parameters())

    def mep_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each chosen encoder level at the model's input size."""
        channels = self.unet.encoder.out_channels
        return [(channels[l], self.input_size // 2**l, self.input_size // 2**l) for l in self.cfg.mep_levels]

    def forward_encoder(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) in 0..1 -> smp's 6 encoder maps; F_l = features[l], (B, C_l, S/2^l, S/2^l)."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise UserError(
                f"the model was built for {self.input_size}x{self.input_size} inputs (MEP sizes depend "
                f"on it) but got {tuple(images.shape[-2:])}: use pipeline size {self.input_size}"
            )
        return self.unet.encoder(images)

    def forward_decoder(self, features: list[Tensor]) -> Tensor:
        """Encoder maps -> reconstruction (B, 3, S, S) float32 in 0..1 (sigmoid in fp32)."""
        logits = self.unet.segmentation_head(self.unet.decoder(features))
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return torch.sigmoid(logits.float())

    def forward_projection(self, features: list[Tensor]) -> list[Tensor]:
        """Eq. 16: per chosen level, flatten (or global max-pool) then one Linear -> (B, D)."""
        out = []
        for level, head in zip(self.cfg.mep_levels, self.projections, strict=True):
            f = features[level]
            f = f.flatten(1) if self.cfg.projection == "flatten" else f.amax(dim=(2, 3))
            out.append(head(f))
        return out

    def forward(self, masked: Tensor, original: Tensor) -> PretrainOutput:
        """masked, original: (N, 3, S, S) in 0..1 (masked pixels exactly 0).

        The original view enters the network when it is reconstructed (branches 'both') or
        when the contrastive term needs its embeddings (MEP levels); otherwise (MAE, AE
        without the contrastive term) only the masked view is computed. Both views: one
        forward of 2N ('joint') or two of N ('separate').
        """
        n = masked.shape[0]
        both = self.cfg.branches == "both"
        temperature = self.temperature() if self.temperature is not None else None
        if not (both or self.cfg.mep_levels):
            recon = self.forward_decoder(self.forward_encoder(masked))
            return PretrainOutput(recon, None, [], [], temperature)
        if self.cfg.branch_forward == "joint":
            features = self.forward_encoder(torch.cat([masked, original]))  # each (2N, C, h, w)
            embeddings = self.forward_projection(features)  # each (2N, D)
            proj_masked, proj_original = [e[:n] for e in embeddings], [e[n:] for e in embeddings]
            if both:
                recon = self.forward_decoder(features)  # (2N, 3, S, S)
                recon_masked, recon_original = recon[:n], recon[n:]
            else:
                recon_masked, recon_original = self.forward_decoder([f[:n] for f in features]), None
        else:
            f_masked, f_original = self.forward_encoder(masked), self.forward_encoder(original)
            proj_masked, proj_original = self.forward_projection(f_masked), self.forward_projection(f_original)
            recon_masked = self.forward_decoder(f_masked)
            recon_original = self.forward_decoder(f_original) if both else None
        return PretrainOutput(recon_masked, recon_original, proj_masked, proj_original, temperature)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Reconstruction only: (B, 3, S, S) in 0..1 -> (B, 3, S, S) float32 in 0..1."""
        return self.forward_decoder(self.forward_encoder(images))
