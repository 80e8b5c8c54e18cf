"""The TCS-MAE network: MEP sizes for the paper's config, one shared forward, config checks."""

from __future__ import annotations

import pytest
import torch

from tcsmae.errors import UserError
from tcsmae.pretrain.config import LossConfig, ModelConfig
from tcsmae.pretrain.model import TCSMAE


def test_paper_config_mep_shapes_mit_b2_256():
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b2", mep_levels=(3, 4, 5)), input_size=256).eval()
    assert model.mep_shapes() == [(128, 32, 32), (320, 16, 16), (512, 8, 8)]
    assert [h.in_features for h in model.projections] == [128 * 32 * 32, 320 * 16 * 16, 512 * 8 * 8]
    assert all(h.out_features == 128 for h in model.projections)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        feats = model.forward_encoder(x)
        assert tuple(feats[4].shape) == (1, 320, 16, 16)  # F4
        assert tuple(feats[5].shape) == (1, 512, 8, 8)  # F5
        assert feats[1].shape[1] == 0  # smp's empty F1 of MiT
        out = model(x, x)
    assert [tuple(p.shape) for p in out.proj_masked] == [(1, 128)] * 3
    assert tuple(out.recon_original.shape) == (1, 3, 256, 256)


@pytest.mark.parametrize("levels", [(), (5,), (4, 5), (3, 4, 5)])
def test_mep_levels_table_v(levels):
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0", mep_levels=levels), input_size=64)
    assert len(model.projections) == len(levels)
    assert (model.temperature is None) == (levels == ())
    masked, original = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    out = model(masked, original)
    assert len(out.proj_masked) == len(levels)
    assert out.recon_masked.dtype == torch.float32
    assert 0 <= out.recon_masked.min() and out.recon_masked.max() <= 1


def test_one_forward_on_the_concatenated_batch_matches_the_parts():
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0"), input_size=64).eval()  # eval: BN uses running stats
    masked, original = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    calls = []
    model.unet.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        out = model(masked, original)
        torch.testing.assert_close(out.recon_masked, model.reconstruct(masked), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.recon_original, model.reconstruct(original), atol=1e-5, rtol=1e-4)
    assert calls[0] == 4  # one encoder call with both branches


def test_maxpool_projection_and_cosine_loss_have_no_temperature():
    model = TCSMAE(ModelConfig(encoder="mit_b0", projection="maxpool", mep_levels=(3, 4, 5)), 64,
                   LossConfig(contrastive="cosine"))
    assert [h.in_features for h in model.projections] == [64, 160, 256]
    assert model.temperature is None


def test_wrong_size_encoder_and_levels_are_user_errors():
    model = TCSMAE(ModelConfig(encoder="mit_b0"), input_size=64)
    with pytest.raises(UserError, match="64x64"):
        model(torch.rand(1, 3, 96, 96), torch.rand(1, 3, 96, 96))
    with pytest.raises(UserError, match="supported encoders"):
        TCSMAE(ModelConfig(encoder="mit_b99"), input_size=64)
    with pytest.raises(UserError, match="0 channels"):
        TCSMAE(ModelConfig(encoder="mit_b0", mep_levels=(1, 5)), input_size=64)
    with pytest.raises(UserError, match="mep_levels"):
        ModelConfig(mep_levels=(5, 4))


@pytest.mark.parametrize("head,levels,size", [("flatten", (4, 5), 64), ("pool", (3, 4, 5), 64),
                                              ("flatten", (5,), 96)])
def test_mep_head_parameter_count_without_building_matches_the_model(head, levels, size):
    from tcsmae.pretrain.model import describe_mep_heads, mep_head_parameters

    cfg = ModelConfig(encoder="mit_b0", projection=head, mep_levels=levels)
    model = TCSMAE(cfg, input_size=size)
    assert mep_head_parameters(cfg, size) == model.mep_parameter_count() > 0
    assert f"{model.mep_parameter_count():,} parameters" in describe_mep_heads(cfg, size)
    assert describe_mep_heads(ModelConfig(mep_levels=()), 256) == "MEP heads: none (no contrastive term)"


def test_paper_flatten_heads_are_14_7_million_parameters():
    from tcsmae.pretrain.model import mep_head_parameters

    # F4: 320 x 16 x 16 -> 128 and F5: 512 x 8 x 8 -> 128, weights and biases (nothing is built)
    want = (320 * 16 * 16 + 1) * 128 + (512 * 8 * 8 + 1) * 128
    assert mep_head_parameters(ModelConfig(), 256) == want == 14_680_320
    assert mep_head_parameters(ModelConfig(projection="pool"), 256) == (320 + 1) * 128 + (512 + 1) * 128
