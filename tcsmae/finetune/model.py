"""The U-Net a fine-tuning run trains: smp.Unet with encoder and decoder from exported
pretrained weights (read by tcsmae.weights) or random, and a fresh segmentation head."""

from __future__ import annotations

from tcsmae.errors import UserError
from tcsmae.weights import PRETRAINED, read_state_dict


def build_model(encoder: str, out_channels: int, init: str):
    """smp.Unet with encoder and decoder from `init` (or random) and a fresh head of out_channels.

    The head is smp's own initialisation of a new `Unet(classes=out_channels)`; every other
    tensor of the exported state dict must load (strict apart from the head).
    """
    import segmentation_models_pytorch as smp

    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise UserError(f"encoder {encoder!r} is not an smp encoder; supported encoders: {names}")
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=out_channels)
    if init == "scratch":
        return model
    state = read_state_dict(init, PRETRAINED, "--init")
    body = {k: v for k, v in state.items() if not k.startswith("segmentation_head.")}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in body.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(f"--init {init} does not fit smp.Unet({encoder!r}): {len(wrong)} tensors differ in "
                        f"shape, e.g. {wrong[0]}; was it exported with another encoder?")
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if not k.startswith("segmentation_head.")]
    if missing or unexpected:
        raise UserError(f"--init {init} does not fit smp.Unet({encoder!r}): missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; was it exported with another encoder?")
    return model
