"""The torch device a command runs on, from its --device option.

    resolve_device("auto")        # cuda:0 when a GPU is visible, else cpu
    resolve_device("cuda", 2)     # cuda:2 (torchrun's LOCAL_RANK); "cuda:K" is taken as given

Shared by pretraining (tcsmae.distributed) and the single-process commands (finetune,
predict, recon-ssim, visualize).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tcsmae.errors import UserError

if TYPE_CHECKING:  # torch is imported when called: `tcsmae --help` stays light
    import torch


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:K' -> a torch.device (cuda:local_rank under torchrun)."""
    import torch

    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {request}: no CUDA GPU is visible here; use --device cpu")
        if request == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(request)
