"""GPU checks (run on a CUDA machine; skipped elsewhere): bf16 network, fp32 losses, the
throughput probe, and CPU/GPU agreement of the losses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tcsmae.bench.probe import measure_train_step
from tcsmae.pretrain.config import LossConfig, ModelConfig, preset
from tcsmae.pretrain.losses import nt_xent, pretraining_loss, ssim_per_image
from tcsmae.pretrain.model import TCSMAE

pytestmark = pytest.mark.gpu


def test_bf16_forward_gives_fp32_reconstructions_and_losses():
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0"), 64).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x * (x > 0.3), x)
    assert out.proj_masked[0].dtype == torch.bfloat16  # the network ran in bf16
    assert out.recon_masked.dtype == torch.float32
    terms = pretraining_loss(out.recon_masked, out.recon_original, x, out.proj_masked, out.proj_original,
                             out.temperature, LossConfig())
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert model.temperature.log_inv_temperature.grad is not None


def test_losses_agree_on_cpu_and_gpu():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    torch.testing.assert_close(ssim_per_image(a.cuda(), b.cuda()).cpu(), ssim_per_image(a, b), atol=1e-6, rtol=1e-5)
    zm, zo = torch.randn(8, 128, generator=g), torch.randn(8, 128, generator=g)
    torch.testing.assert_close(nt_xent(zm.cuda(), zo.cuda(), 0.07).cpu(), nt_xent(zm, zo, 0.07), atol=1e-5, rtol=1e-5)


def test_measure_train_step_on_cuda_reports_bf16_throughput_and_mfu():
    cfg = preset("demo")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, size=64))
    r = measure_train_step(cfg, "cuda", batch_size=8, seconds=1.0, warmup_steps=2)
    assert r["precision"] == "bfloat16" and r["pairs_per_s"] > 0 and r["peak_mem_gb"] > 0
    assert r["flops_per_pair"] > 0
    if any(k in r["device"] for k in ("H100", "H200", "A100")):
        assert 0 < r["mfu"] < 1
