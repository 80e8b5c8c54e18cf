"""The TCS-MAE network: one smp U-Net for both branches plus the MEP projection heads.

Forward is split into named stages (MAE's style):

    features = model.forward_encoder(images)       # smp encoder: 6 maps, F1..F5 = [1:]
    recon = model.forward_decoder(features)        # U-Net decoder + head, sigmoid in fp32
    embeddings = model.forward_projection(features)  # one (B, D) per MEP level (Eq. 16)
    out = model(masked, original)                  # all three on the concatenated batch

The masked and the original batch go through the network together, as one batch of 2N
(one set of weights, one forward; note that BatchNorm in the decoder then sees both views).
For mit_b2 at 256x256 the MiT encoder maps are 64@64x64 (F2), 128@32x32 (F3), 320@16x16
(F4) and 512@8x8 (F5); F1 is smp's empty 0-channel map. Because MEP flattens, the Linear
sizes depend on the input size: a model is built for one `input_size`.

The `unet` attribute is a plain `smp.Unet(encoder_name, encoder_weights, in_channels=3,
classes=3)` with no activation (the sigmoid is applied here in float32), so its state dict
is exactly what `tcsmae export` writes. No DALI, zarr or argparse here.
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


@dataclass
class PretrainOutput:
    """What one forward of both branches returns (N slices per branch).

    recon_masked, recon_original: (N, 3, H, W) float32 in 0..1 (sigmoid).
    proj_masked, proj_original: one (N, D) tensor per MEP level, network dtype.
    temperature: float32 scalar tensor (NT-Xent), or None when there is no learnable one.
    """

    recon_masked: Tensor
    recon_original: Tensor
    proj_masked: list[Tensor]
    proj_original: list[Tensor]
    temperature: Tensor | None


class TCSMAE(nn.Module):
    """U-Net reconstruction network with MEP heads and the learnable NT-Xent temperature.

    cfg: the model config; input_size: training image side in pixels (multiple of 32);
    loss_cfg: decides whether a temperature is learnt (NT-Xent with at least one level).
    """

    def __init__(self, cfg: ModelConfig, input_size: int, loss_cfg: LossConfig | None = None):
        super().__init__()
        loss_cfg = loss_cfg or LossConfig()
        self.cfg = cfg
        self.input_size = int(input_size)
        self.unet = build_unet(cfg.encoder, cfg.encoder_weights)
        channels = self.unet.encoder.out_channels  # [in, F1, F2, F3, F4, F5]
        heads = []
        for level in cfg.mep_levels:
            c = channels[level]
            if c == 0:
                raise UserError(
                    f"MEP level F{level} of encoder {cfg.encoder!r} has 0 channels (smp's MiT has "
                    "an empty F1): choose levels from F2..F5, e.g. model.mep_levels [4, 5]"
                )
            side = self.input_size // 2**level
            in_features = c * side * side if cfg.projection == "flatten" else c
            heads.append(nn.Linear(in_features, cfg.projection_dim))
        self.projections = nn.ModuleList(heads)
        self.temperature = None
        if cfg.mep_levels and loss_cfg.contrastive == "ntxent":
            self.temperature = LearnableTemperature(loss_cfg.temperature_init, loss_cfg.temperature_floor)
            self.temperature.log_inv_temperature.requires_grad_(loss_cfg.learn_temperature)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "TCSMAE":
        return cls(cfg.model, cfg.input_size, cfg.loss)

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
        """masked, original: (N, 3, S, S) in 0..1 (masked pixels exactly 0). One forward of 2N."""
        n = masked.shape[0]
        features = self.forward_encoder(torch.cat([masked, original]))  # each (2N, C, h, w)
        recon = self.forward_decoder(features)  # (2N, 3, S, S)
        embeddings = self.forward_projection(features)  # each (2N, D)
        return PretrainOutput(
            recon_masked=recon[:n],
            recon_original=recon[n:],
            proj_masked=[e[:n] for e in embeddings],
            proj_original=[e[n:] for e in embeddings],
            temperature=self.temperature() if self.temperature is not None else None,
        )

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Reconstruction only: (B, 3, S, S) in 0..1 -> (B, 3, S, S) float32 in 0..1."""
        return self.forward_decoder(self.forward_encoder(images))
