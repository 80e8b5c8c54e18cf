"""Pretraining objectives as settings (AE, MAE with or without the contrastive term,
Patch+Unmask, TCS-MAE): which views enter the network, what the loss sees, joint vs
separate branch forwards, --mep-head; each objective trains one step and exports through
the CLI (mit_b0, 64 px)."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from dataclasses import replace

import pytest
import segmentation_models_pytorch as smp
import torch

from tcsmae.errors import UserError
from tcsmae.plain import to_plain
from tcsmae.pretrain.config import (
    OBJECTIVES,
    LossConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    objective_overrides,
    preset,
)
from tcsmae.pretrain.losses import PretrainingLoss, ssim_loss
from tcsmae.pretrain.model import TCSMAE
from tcsmae.settings import add_flags, flag_overrides

SIZE = 64


@pytest.mark.parametrize("name,masking,branches,levels", [
    ("ae", "none", "masked", ()),
    ("mae", "patch", "masked", ()),
    ("patch-unmask", "patch", "both", (4, 5)),
    ("tcs-mae", "tissue", "both", (4, 5)),
])
def test_objectives_are_the_papers_settings(name, masking, branches, levels):
    cfg = apply_overrides(preset("paper"), objective_overrides(name), where="test")
    assert (cfg.pipeline.masking, cfg.model.branches, cfg.model.mep_levels) == (masking, branches, levels)
    assert cfg.pipeline.patch_size == 16 and cfg.pipeline.patch_ratio == 0.75  # Table IV's patches
    assert (cfg.pipeline.intervals, cfg.pipeline.rho) == (8, 0.75)  # Table IV's tissue masking
    with_con = apply_overrides(preset("paper"), objective_overrides(name, contrastive=True), where="test")
    without = apply_overrides(preset("paper"), objective_overrides(name, contrastive=False), where="test")
    assert with_con.model.mep_levels == (4, 5) and without.model.mep_levels == ()
    assert with_con.pipeline.masking == without.pipeline.masking == masking


def test_tcs_mae_objective_is_the_default_config_and_unknown_names_are_refused():
    assert apply_overrides(preset("paper"), objective_overrides("tcs-mae"), where="t") == preset("paper")
    assert set(OBJECTIVES) == {"ae", "mae", "patch-unmask", "tcs-mae"}
    with pytest.raises(UserError, match="'cmae' is unknown.*tcs-mae"):
        objective_overrides("cmae")


def _counted(model: TCSMAE) -> dict:
    """Batch sizes seen by the encoder and the decoder, per call."""
    seen = {"encoder": [], "decoder": []}
    model.unet.encoder.register_forward_hook(lambda m, i, o: seen["encoder"].append(i[0].shape[0]))
    model.unet.decoder.register_forward_hook(lambda m, i, o: seen["decoder"].append(o.shape[0]))
    return seen


def _views(n=2):
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, 3, SIZE, SIZE, generator=g), torch.rand(n, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("levels", [(), (4, 5)])
def test_both_branches_send_gradient_to_the_original_view(levels):
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0", mep_levels=levels), SIZE)
    seen = _counted(model)
    masked, original = _views()
    original.requires_grad_(True)
    out = model(masked, original)
    assert seen == {"encoder": [4], "decoder": [4]}
    PretrainingLoss(LossConfig())(out, original.detach()).loss.backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_mae_never_computes_the_unmasked_branch():
    """MAE (and AE): only the masked view enters the network; the loss has zero gradient
    for the unmasked branch because that branch is never computed."""
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0", branches="masked", mep_levels=()), SIZE)
    seen = _counted(model)
    masked, original = _views()
    original.requires_grad_(True)  # as a network input; the SSIM target is a detached copy
    out = model(masked, original)
    assert out.recon_original is None and out.proj_masked == out.proj_original == []
    assert out.temperature is None and model.temperature is None
    assert seen == {"encoder": [2], "decoder": [2]}  # N, never 2N
    terms = PretrainingLoss(LossConfig())(out, original.detach())
    torch.testing.assert_close(terms.loss, ssim_loss(out.recon_masked, original.detach()))
    assert terms.loss_con.item() == 0.0
    terms.loss.backward()
    assert original.grad is None  # nothing of the loss depends on the unmasked branch
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("forward", ["joint", "separate"])
def test_mae_with_contrastive_term_encodes_the_original_but_reconstructs_the_masked_view(forward):
    torch.manual_seed(0)
    model = TCSMAE(ModelConfig(encoder="mit_b0", branches="masked", mep_levels=(4, 5),
                               branch_forward=forward), SIZE)
    seen = _counted(model)
    masked, original = _views()
    original.requires_grad_(True)
    out = model(masked, original)
    assert out.recon_original is None and out.recon_masked.shape == (2, 3, SIZE, SIZE)
    assert [p.shape for p in out.proj_original] == [(2, 128)] * 2
    assert seen == ({"encoder": [4], "decoder": [2]} if forward == "joint"
                    else {"encoder": [2, 2], "decoder": [2]})
    terms = PretrainingLoss(LossConfig())(out, original.detach())
    assert terms.loss_con.item() > 0
    terms.loss.backward()
    assert original.grad is not None and original.grad.abs().sum() > 0  # through the contrastive term only


def test_separate_branch_forward_keeps_batchnorm_statistics_per_view():
    torch.manual_seed(0)
    joint = TCSMAE(ModelConfig(encoder="mit_b0"), SIZE)
    separate = TCSMAE(ModelConfig(encoder="mit_b0", branch_forward="separate"), SIZE)
    separate.load_state_dict(joint.state_dict())
    masked, original = _views()
    with torch.no_grad():  # eval: running statistics, so both forwards compute the same function
        a, b = joint.eval()(masked, original), separate.eval()(masked, original)
    for x, y in [(a.recon_masked, b.recon_masked), (a.recon_original, b.recon_original),
                 *zip(a.proj_masked + a.proj_original, b.proj_masked + b.proj_original)]:
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    seen = _counted(separate)
    bn = [m for m in separate.unet.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_joint = [m for m in joint.unet.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn, "the U-Net decoder has BatchNorm"
    with torch.no_grad():
        joint.train()(masked, original)
        separate.train()(masked, original)
    assert seen == {"encoder": [2, 2], "decoder": [2, 2]}
    assert all(int(m.num_batches_tracked) == 2 for m in bn)  # one update per view
    assert all(int(m.num_batches_tracked) == 1 for m in bn_joint)  # one over both views


def test_mep_head_branches_and_branch_forward_flags():
    parser = ArgumentParser()
    add_flags(parser, TrainConfig)
    args = parser.parse_args(["--mep-head", "pool", "--branches", "masked", "--branch-forward", "separate"])
    cfg = apply_overrides(TrainConfig(), flag_overrides(args, TrainConfig), where="flags")
    assert cfg.model.projection == "maxpool"  # stored as older configs and the 'authors' variant have it
    assert (cfg.model.branches, cfg.model.branch_forward) == ("masked", "separate")
    help_text = " ".join(parser.format_help().split())
    assert "--mep-head {flatten,pool}" in help_text and "(default: flatten)" in help_text
    assert "--branches {both,masked}" in help_text and "--branch-forward {joint,separate}" in help_text
    defaults = apply_overrides(TrainConfig(), flag_overrides(parser.parse_args([]), TrainConfig), where="flags")
    assert defaults.model == ModelConfig()
    assert (ModelConfig().projection, ModelConfig().branches, ModelConfig().branch_forward) == (
        "flatten", "both", "joint")


def test_stored_configs_without_the_new_fields_and_with_maxpool_still_load():
    old = to_plain(TrainConfig())
    old["model"]["projection"] = "maxpool"
    del old["model"]["branches"], old["model"]["branch_forward"]
    cfg = config_from_dict(old)
    assert cfg.model.projection == "maxpool" and cfg.model.branches == "both"
    assert cfg.model.branch_forward == "joint"
    assert config_from_dict({"model": {"projection": "pool"}}).model.projection == "maxpool"
    for bad in ({"projection": "avg"}, {"branches": "original"}, {"branch_forward": "twice"}):
        with pytest.raises(UserError):
            config_from_dict({"model": bad})


# ------------------------------------------------------------------ each objective trains and exports

@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    """2 phantom cases x 6 slices of 64x64, converted."""
    from tcsmae.cli import main
    from tcsmae.phantom.anatomy import PhantomConfig
    from tcsmae.phantom.dicom import write_phantom

    root = tmp_path_factory.mktemp("objectives")
    write_phantom(PhantomConfig(cases=2, size=64, slices=6), root / "src", progress=False)
    store = root / "ph.zarr"
    assert main(["convert", "--manifest", str(root / "src" / "manifest.csv"), "-o", str(store),
                 "--workers", "1"]) == 0
    return store


@pytest.mark.parametrize("name,contrastive,extra", [
    ("ae", None, []),
    ("mae", None, []),
    ("mae", True, ["--branch-forward", "separate"]),
    ("patch-unmask", None, ["--mep-head", "pool"]),
    ("tcs-mae", None, []),
])
def test_each_objective_trains_and_exports(phantom_store, tmp_path, name, contrastive, extra):
    from tcsmae.cli import main

    overrides = tmp_path / "objective.json"
    overrides.write_text(json.dumps(objective_overrides(name, contrastive)))
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(phantom_store), "--out", str(run), "--preset", "demo",
                 "--config", str(overrides), "--size", str(SIZE), "--batch-size", "2", "--epochs", "1",
                 "--steps-per-epoch", "1", "--workers", "0", "--device", "cpu", *extra]) == 0
    stored = json.loads((run / "config.json").read_text())
    want = objective_overrides(name, contrastive)
    assert stored["pipeline"]["masking"] == want["pipeline"]["masking"]
    assert stored["model"]["branches"] == want["model"]["branches"]
    assert stored["model"]["mep_levels"] == want["model"]["mep_levels"]
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    reconstructed = 2 if want["model"]["branches"] == "both" else 1
    assert 0 < line["loss_ssim"] <= reconstructed  # one (1 - SSIM) term per reconstructed view
    assert (line["loss_con"] > 0) == bool(want["model"]["mep_levels"])
    weights = tmp_path / "weights.pt"
    assert main(["export", str(run / "checkpoints" / "last.pt"), "-o", str(weights)]) == 0
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["masking"] == want["pipeline"]["masking"] and meta["config"]["model"]["branches"] == \
        want["model"]["branches"]
    unet = smp.Unet(encoder_name="mit_b0", encoder_weights=None, in_channels=3, classes=3)
    unet.load_state_dict(torch.load(weights, weights_only=True), strict=True)


def test_flatten_heads_on_a_resume_with_another_head_are_refused(tmp_path):
    a = TCSMAE(ModelConfig(encoder="mit_b0"), SIZE)
    b = TCSMAE(ModelConfig(encoder="mit_b0", projection="pool"), SIZE)
    with pytest.raises(RuntimeError):
        b.load_state_dict(a.state_dict())
    same = TCSMAE(replace(ModelConfig(encoder="mit_b0"), branches="masked", branch_forward="separate"), SIZE)
    same.load_state_dict(a.state_dict())  # branches and branch forward change no weight
