"""Fine-tuning pieces: head replacement, geometry of whole-volume inference, leakage guard,
resume, results layout. Tiny synthetic stores (disks in noise), mit_b0 at 32 px."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tcsmae.case_digests import salted_digest
from tcsmae.cli import main
from tcsmae.errors import UserError
from tcsmae.finetune.command import FinetuneConfig, build_model, finetune
from tcsmae.finetune.inference import logits_to_stored_grid, segment_volume
from tcsmae.finetune.metrics import dice
from tcsmae.pipelines.config import PipelineConfig

pytestmark = pytest.mark.filterwarnings("ignore:case .* has no patient id")


def _disk_case(rng, z=6, y=40, x=48):
    """HU (z, y, x) with a +60 HU disk (label 3) in -800 HU 'lung', plus noise."""
    yy, xx = np.mgrid[:y, :x]
    cy, cx, r = rng.uniform(12, y - 12), rng.uniform(12, x - 12), rng.uniform(6, 10)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    hu = np.where(disk, 60.0, -800.0)[None].repeat(z, 0) + rng.normal(0, 10, (z, y, x))
    return hu.astype(np.float32), np.where(disk, 3, 0)[None].repeat(z, 0).astype(np.uint8)


def _attrs(n_slices, patient_id, series_uid, sha):
    """Case attributes as the converters write them (2 x 1 x 1 mm, identity direction)."""
    return {"spacing_mm": [2.0, 1.0, 1.0], "origin_mm": [0.0, 0.0, 0.0],
            "direction": np.eye(3).tolist(), "z_positions_mm": [2.0 * k for k in range(n_slices)],
            "patient_id": patient_id, "study_uid": "", "series_uid": series_uid,
            "source_sha256": sha, "warnings": []}


def _store(path, n=3, seed=0, series=None):
    from tcsmae.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    with StoreWriter(path) as w:
        for i in range(n):
            hu, lab = _disk_case(rng)
            attrs = _attrs(len(hu), f"P{i}", (series or {}).get(i, f"1.2.{i}"), f"{seed}-{i}")
            w.write_case(f"case{i}", hu, attrs, labels=lab)
    return path


def _weights(tmp_path, encoder="mit_b0", **meta):
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    unet = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=3)
    path = tmp_path / "weights.pt"
    torch.save(unet.state_dict(), path)
    (tmp_path / "weights.json").write_text(json.dumps({"encoder": encoder, **meta}))
    return path, unet.state_dict()


def test_head_replaced_rest_loaded(tmp_path):
    path, saved = _weights(tmp_path)
    torch.manual_seed(5)
    model = build_model("mit_b0", 4, str(path))
    state = model.state_dict()
    for k, v in saved.items():
        if k.startswith("segmentation_head."):
            assert state[k].shape != v.shape or not torch.equal(state[k], v)
        else:
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert state["segmentation_head.0.weight"].shape[0] == 4
    assert torch.count_nonzero(state["segmentation_head.0.bias"]) == 0  # smp's head init
    binary = build_model("mit_b0", 1, str(path))
    assert binary.segmentation_head[0].out_channels == 1


def test_bad_init_and_encoder_mismatch(tmp_path):
    path, _ = _weights(tmp_path)
    with pytest.raises(UserError, match="does not fit"):
        build_model("mit_b1", 2, str(path))
    checkpoint = tmp_path / "last.pt"  # a pretraining checkpoint instead of exported weights
    torch.save({"format": "tcsmae-pretrain", "model": torch.load(path, weights_only=True), "optimizer": {}},
               checkpoint)
    with pytest.raises(UserError, match="is a pretraining checkpoint.*tcsmae export"):
        build_model("mit_b0", 2, str(checkpoint))
    cfg = FinetuneConfig(init=str(path), encoder="resnet18", size=32)
    with pytest.raises(UserError, match="holds a mit_b0 encoder"):
        finetune(_store(tmp_path / "s.zarr"), tmp_path / "out", cfg)
    with pytest.raises(UserError, match="multiple of 32"):
        FinetuneConfig(size=100)
    with pytest.raises(UserError, match="--fold 5"):
        FinetuneConfig(folds=5, fold=5)


def test_inference_undoes_padding_and_resize():
    """A 'model' that thresholds the mediastinal channel must give back the disk on the stored grid."""
    rng = np.random.default_rng(0)
    hu, lab = _disk_case(rng, z=3, y=40, x=70)  # non-square: padded top and bottom
    cfg = PipelineConfig(masking="none", size=64)

    class Threshold(torch.nn.Module):
        def forward(self, x):  # (B, 3, S, S) -> (B, 1, S, S) logits
            return (x[:, 1:2] - 0.3) * 50  # half way: -800 HU -> 0, +60 HU -> 0.6

    pred = segment_volume(Threshold(), hu, cfg)
    assert pred.shape == hu.shape
    good = dice(pred == 1, lab > 0)
    assert good > 0.9, good
    # a crop off by a few rows (wrong padding offset) would score clearly lower
    assert dice(pred == 1, np.roll(lab > 0, 4, axis=1)) < good - 0.1
    # and the logits crop is exactly the unpadded window
    logits = torch.zeros(1, 1, 70, 70)
    logits[:, :, 15:55, :] = 1.0
    back = logits_to_stored_grid(logits, (40, 70))
    assert back.shape == (1, 1, 40, 70) and bool((back == 1).all())


def test_leakage_guard_refuses_then_allows(tmp_path, capsys, monkeypatch):
    salt = "abc"
    store = _store(tmp_path / "s.zarr", series={1: "9.9.9"})
    path, _ = _weights(tmp_path, pretraining_cases={"salt": salt, "series_digests": [salted_digest(salt, "9.9.9")],
                                                    "patient_digests": [], "case_digests": []})
    args = ["finetune", "--data", str(store), "--out", str(tmp_path / "run"), "--init", str(path),
            "--folds", "1", "--epochs", "1", "--size", "32", "--batch-size", "4", "--device", "cpu",
            "--workers", "0", "--lr", "1e-3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "case1: its series appeared in pretraining" in err and "--allow-overlap" in err
    assert not (tmp_path / "run" / "results.json").exists()
    import tcsmae.finetune.command as ft

    reached = []
    monkeypatch.setattr(ft, "run_fold", lambda *a, **k: reached.append(a[3]))  # skip training
    monkeypatch.setattr(ft, "collect_results", lambda *a, **k: {"folds": [], "mean": {}, "std": {}})
    monkeypatch.setattr(ft, "plot_val_dsc", lambda *a, **k: None)
    with pytest.warns(UserWarning, match="allowed by --allow-overlap"):
        ft.finetune(store, tmp_path / "run", ft.FinetuneConfig(init=str(path), folds=1, size=32,
                                                               allow_overlap=True))
    assert reached == [0]


def test_run_layout_resume_and_results(tmp_path):
    store = _store(tmp_path / "s.zarr", n=2)
    lm = tmp_path / "map.json"
    lm.write_text(json.dumps({"classes": {"disk": [3]}, "groups": {"all": ["disk"]}}))
    base = dict(encoder="mit_b0", label_map=str(lm), folds=2, size=32, batch_size=3, lr=1e-3, device="cpu",
                workers=0, seed=2)
    straight = finetune(store, tmp_path / "a", FinetuneConfig(epochs=2, fold=0, **base))
    finetune(store, tmp_path / "b", FinetuneConfig(epochs=1, fold=0, **base))
    resumed = finetune(store, tmp_path / "b", FinetuneConfig(epochs=2, fold=0, **base))
    ha = json.loads((tmp_path / "a" / "fold_0" / "scores.json").read_text())["history"]
    hb = json.loads((tmp_path / "b" / "fold_0" / "scores.json").read_text())["history"]
    assert [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert resumed["folds"][0]["classes"]["disk"]["dsc"] == pytest.approx(straight["folds"][0]["classes"]["disk"]["dsc"], rel=1e-5)
    # layout and shape of results.json
    out = tmp_path / "a"
    for name in ("folds.json", "results.json", "val_dsc.png", "fold_0/last.pt", "fold_0/best.pt", "fold_0/history.json",
                 "fold_0/finetuned.pt", "fold_0/finetuned.json"):
        assert (out / name).is_file(), name
    assert straight["complete"] is False and len(straight["folds"]) == 1
    entry = straight["folds"][0]["classes"]["disk"]
    assert set(entry) >= {"dsc", "hd95_mm", "n_undefined"}
    assert set(straight["mean"]["groups"]["all"]) >= {"dsc", "hd95_mm", "n_undefined"}
    val_case = json.loads((out / "folds.json").read_text())["folds"][0]["val"][0]
    assert straight["cases"][val_case]["fold"] == 0
    assert straight["config"]["lr"] == 1e-3 and straight["weights"] == {"init": "scratch"}
    assert straight["label_map"]["classes"] == {"disk": [3]}
    ckpt = torch.load(out / "fold_0" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["pipeline"]["masking"] == "none"
    meta = json.loads((out / "fold_0" / "finetuned.json").read_text())
    assert meta["classes"] == 1 and meta["activation"] == "sigmoid" and meta["class_names"] == ["disk"]
    # a finished fold is not trained again
    again = finetune(store, tmp_path / "a", FinetuneConfig(epochs=2, fold=0, **base))
    assert again["folds"] == straight["folds"]
    # a different setting in the same folder is refused
    with pytest.raises(UserError, match="other settings"):
        finetune(store, tmp_path / "b", FinetuneConfig(epochs=3, fold=0, **{**base, "lr": 1e-2}))
    with pytest.raises(UserError, match=r"lr: 0.001 -> 0.01"):
        finetune(store, tmp_path / "b", FinetuneConfig(epochs=3, fold=0, **{**base, "lr": 1e-2}))


@pytest.mark.gpu
def test_finetune_and_predict_on_gpu(tmp_path):
    """The CUDA path: DALI GPU loader, model and whole-volume inference on the GPU."""
    store = _store(tmp_path / "s.zarr", n=2)
    res = finetune(store, tmp_path / "gpu", FinetuneConfig(encoder="mit_b0", folds=2, fold=0, epochs=2, size=64,
                                                          batch_size=4, lr=1e-3, device="cuda", workers=1))
    assert res["folds"][0]["classes"]["foreground"]["dsc"] is not None
    assert main(["predict", "--weights", str(tmp_path / "gpu" / "fold_0" / "finetuned.pt"), "--data", str(store),
                 "-o", str(tmp_path / "pred"), "--device", "cuda"]) == 0
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 2


def test_store_without_labels_is_refused(tmp_path):
    from tcsmae.store.writer import StoreWriter

    path = tmp_path / "s.zarr"
    with StoreWriter(path) as w:
        hu, _ = _disk_case(np.random.default_rng(0))
        w.write_case("bare", hu, _attrs(len(hu), "", "", "x"))
    with pytest.raises(UserError, match="no case has labels"):
        finetune(path, tmp_path / "out", FinetuneConfig(size=32))


def test_unlabelled_cases_are_left_out_with_a_warning(tmp_path):
    store = _store(tmp_path / "s.zarr", n=2)
    from tcsmae.store.writer import StoreWriter

    with StoreWriter(store) as w:
        hu, _ = _disk_case(np.random.default_rng(5))
        w.write_case("bare", hu, _attrs(len(hu), "P9", "9", "y"))
    lm = tmp_path / "map.json"
    lm.write_text(json.dumps({"classes": {"disk": [3]}}))
    cfg = FinetuneConfig(encoder="mit_b0", label_map=str(lm), folds=2, fold=0, epochs=1, size=32,
                         batch_size=3, lr=1e-3, device="cpu", workers=0)
    with pytest.warns(UserWarning, match="without labels are left out"):
        result = finetune(store, tmp_path / "out", cfg)
    folds = json.loads((tmp_path / "out" / "folds.json").read_text())["folds"]
    assert "bare" not in {c for f in folds for c in f["train"] + f["val"]}
    assert "bare" not in result["cases"]


def test_start_summary_progress_and_resume_with_equivalent_settings(tmp_path, capsys, monkeypatch):
    """A relative --init, then the same file by its absolute path and --encoder equal to
    weights.json's, resume the fold; other weights are refused. The console shows the run's
    settings once, a progress bar with its total and the validation DSC in percent."""
    store = _store(tmp_path / "s.zarr", n=2)
    _weights(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--data", str(store), "--out", str(tmp_path / "run"), "--folds", "2", "--fold", "0",
            "--size", "32", "--batch-size", "3", "--device", "cpu", "--workers", "0", "--lr", "1e-3"]
    assert main(args + ["--init", "weights.pt", "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.count("fine-tuning mit_b0 from weights.pt on cpu: 2 fold(s) (only fold 0), 1 epochs, "
                     "lr 0.001, batch 3, size 32, 2 labelled cases") == 1
    assert "  fold 0: train 1 case(s) (6 slices, 2 batches per epoch), validation 1 case(s) (6 slices)" in out
    assert re.search(r"fold 0 epoch 1: loss \d+\.\d{4}, validation DSC \d+\.\d{2}%", out), out
    assert "| 0/2 [" in err  # the bar knows its total
    absolute = args + ["--init", str(tmp_path / "weights.pt"), "--encoder", "mit_b0"]
    assert main(absolute + ["--epochs", "2"]) == 0
    assert "fold 0: resuming after epoch 1" in capsys.readouterr().out
    assert main(absolute + ["--epochs", "2"]) == 0  # finished: not trained again
    assert "fold 0: already done" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    _weights(other)
    state = torch.load(other / "weights.pt", weights_only=True)
    state["decoder.blocks.0.conv1.0.weight"] += 1  # other weights, same architecture
    torch.save(state, other / "weights.pt")
    assert main(args + ["--init", str(other / "weights.pt"), "--epochs", "3"]) == 2
    assert re.search(r"last.pt was written with other settings \(init: 'sha256:[0-9a-f]{64}' -> "
                     r"'sha256:[0-9a-f]{64}'\)", capsys.readouterr().err)


def test_settings_errors_name_the_flag_and_the_inputs_pipeline_is_derived():
    with pytest.raises(UserError, match="^--folds 0: must be >= 1$"):
        FinetuneConfig(folds=0)
    with pytest.raises(UserError, match="^--batch-size 0: must be >= 1$"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(UserError, match="^--evaluate 'worst': choose one of"):
        FinetuneConfig(evaluate="worst")
    with pytest.raises(UserError, match="^threshold=1.5: must lie in"):  # a field without a flag
        FinetuneConfig(threshold=1.5)
    base = PipelineConfig(masking="tissue", size=128, augment=True, seed=9, body_fraction_min=0.2,
                          lung_window=(-600.0, 1500.0))
    cfg = FinetuneConfig(size=32, seed=2, pipeline=base)
    assert cfg.pipeline == base  # kept as given
    assert cfg.input_pipeline() == PipelineConfig(masking="none", size=32, augment=False, seed=2,
                                                  body_fraction_min=0.0, lung_window=(-600.0, 1500.0))
    record = cfg.record()  # what checkpoints, scores.json and results.json hold
    assert json.loads(json.dumps(record)) == record  # plain values only
    pipe = record["pipeline"]
    assert (pipe["masking"], pipe["size"], pipe["augment"], pipe["seed"], pipe["body_fraction_min"]) == \
        ("none", 32, False, 2, 0.0) and pipe["lung_window"] == [-600.0, 1500.0]
    assert list(record) == ["init", "encoder", "label_map", "folds", "fold", "epochs", "lr", "batch_size", "size",
                            "seed", "device", "allow_overlap", "evaluate", "threshold", "ce_weight",
                            "dice_weight", "workers", "precision", "pipeline"]


def test_flags_become_the_config():
    from argparse import ArgumentParser

    from tcsmae.finetune import command
    from tcsmae.settings import apply_settings, flag_overrides

    parser = ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--data", "s.zarr", "--out", "o", "--init", "scratch", "--labels-map", "chest11",
                              "--folds", "2", "--fold", "1", "--lr", "1e-3", "--allow-overlap", "--evaluate", "best"])
    cfg = apply_settings(FinetuneConfig(), flag_overrides(args, FinetuneConfig), "flags")
    assert cfg == FinetuneConfig(init="scratch", label_map="chest11", folds=2, fold=1, lr=1e-3, allow_overlap=True,
                                 evaluate="best")
    with pytest.raises(SystemExit):  # --init is required
        parser.parse_args(["--data", "s.zarr", "--out", "o"])
    with pytest.raises(UserError, match="--fold 2: must lie in 0..1"):
        apply_settings(cfg, flag_overrides(parser.parse_args(["--data", "s", "--out", "o", "--init", "x",
                                                              "--folds", "2", "--fold", "2"]), FinetuneConfig), "flags")
