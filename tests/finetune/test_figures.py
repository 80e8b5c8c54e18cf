"""recon-ssim (Fig. 5) and visualize (Fig. 6) on a tiny store with stand-in weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from test_finetune import _store

from tcsmae.cli import main
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.reference import prepared_pair
from tcsmae.pretrain.recon_ssim import reconstruction_ssim, sample_slices
from tcsmae.store.reader import open_store

pytestmark = pytest.mark.filterwarnings("ignore:case .* has no patient id")


class Identity(torch.nn.Module):
    """Logits whose sigmoid is the input: a perfect reconstruction of what it is given."""

    def forward(self, x):
        return torch.logit(x.clamp(1e-6, 1 - 1e-6))


def test_ssim_known_answers(tmp_path):
    store = open_store(_store(tmp_path / "s.zarr", n=2))
    cfg = PipelineConfig(masking="tissue", size=32, rho=0.5, seed=3)
    ids = sample_slices(store.n_slices, 4, seed=1)
    assert len(set(ids.tolist())) == 4 and (np.diff(ids) > 0).all()
    res = reconstruction_ssim(Identity(), store, ids, cfg)
    np.testing.assert_allclose(res["unmasked"], 1.0, atol=1e-4)
    for k, slice_id in enumerate(ids):
        original, masked = prepared_pair(store, int(slice_id), cfg)
        expected = np.mean([structural_similarity(masked[c], original[c], gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=1.0)
                            for c in range(3)])
        assert res["masked"][k] == pytest.approx(expected, abs=2e-3)
        assert res["masked"][k] < 0.999  # the mask removed something


def _pretrained(tmp_path, size=32):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    unet = smp.Unet(encoder_name="mit_b0", encoder_weights=None, in_channels=3, classes=3)
    torch.save(unet.state_dict(), tmp_path / "weights.pt")
    pipe = {"masking": "tissue", "size": size, "rho": 0.75, "intervals": 8, "lung_window": [-500.0, 1200.0]}
    (tmp_path / "weights.json").write_text(json.dumps({"encoder": "mit_b0", "classes": 3, "input_size": size,
                                                       "config": {"pipeline": pipe}}))
    return tmp_path / "weights.pt"


def test_recon_ssim_cli_writes_values_and_plot(tmp_path, capsys):
    store = _store(tmp_path / "s.zarr", n=2)
    weights = _pretrained(tmp_path)
    out = tmp_path / "ssim"
    assert main(["recon-ssim", "--weights", str(weights), str(weights), "--names", "A", "B", "--data", str(store),
                 "--n", "5", "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads((out / "recon_ssim.json").read_text())
    assert len(doc["slice_ids"]) == 5 and set(doc["models"]) == {"A", "B"}
    a = doc["models"]["A"]
    assert len(a["masked"]) == len(a["unmasked"]) == 5 and a["masking"] == "tissue"
    assert all(-1 <= v <= 1 for v in a["masked"] + a["unmasked"])
    assert a["masked"] == doc["models"]["B"]["masked"]  # same weights, same slices and masks
    npz = np.load(out / "recon_ssim.npz")
    np.testing.assert_allclose(npz["A_unmasked"], a["unmasked"])
    assert (out / "recon_ssim.png").stat().st_size > 1000
    assert main(["recon-ssim", "--weights", str(weights), "--data", str(store), "--n", "0"]) == 2
    assert main(["recon-ssim", "--weights", str(weights), "--data", str(store), "--size", "100"]) == 2
    (tmp_path / "b").mkdir()
    other = _pretrained(tmp_path / "b", size=64)  # trained at another size
    capsys.readouterr()
    assert main(["recon-ssim", "--weights", str(weights), str(other), "--names", "A", "B", "--data", str(store),
                 "--n", "2", "--out", str(tmp_path / "ssim2"), "--device", "cpu"]) == 0
    assert "different sizes (A 32, B 64)" in capsys.readouterr().err


def test_visualize_panels(tmp_path):
    import matplotlib.image as mpimg

    from tcsmae.finetune.command import FinetuneConfig, build_model, export_finetuned
    from tcsmae.finetune.labelmap import LabelMap

    store = _store(tmp_path / "s.zarr", n=2)
    weights = _pretrained(tmp_path)
    lm = LabelMap(classes={"disk": (3,)})
    cfg = FinetuneConfig(size=32, encoder="mit_b0")
    export_finetuned(build_model("mit_b0", 1, "scratch"), tmp_path / "ft.pt", "mit_b0", lm, cfg, {}, 0, 1)
    png = tmp_path / "fig.png"
    assert main(["visualize", "--weights", str(weights), "--data", str(store), "--finetuned", str(tmp_path / "ft.pt"),
                 "--slices", "case0:1", "case1:4", "-o", str(png), "--device", "cpu"]) == 0
    h, w = mpimg.imread(png).shape[:2]
    assert w > h  # two rows of four panels
    assert main(["visualize", "--weights", str(weights), "--data", str(store), "--slices", "case9:1",
                 "-o", str(png)]) == 2
