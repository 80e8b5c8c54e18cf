"""End to end on the real CT samples in ../shared/data: convert -> fine-tune -> score -> predict.

Short CPU runs (mit_b0, 64 px, lr 3e-3, batch 6, scratch init) on the DICOM series and the
small NIfTI volume, both converted with their TotalSegmentator label maps:

- lungs (NIfTI volume, `--folds 1`: train = validation, the sanity check of the issue)
  reach a DSC well above 0.5, and `tcsmae predict --nifti` writes a label map in the
  source's own geometry that agrees with the source's label file;
- liver across the two volumes (`--folds 2`: train on one scan, validate on the other)
  reaches a DSC well above 0.5 in both directions, so images and labels line up in both
  converters and in the way back to the stored grid;
- the control: the same run with the DICOM label map flipped (both in-plane axes, what a
  forgotten RAS -> LPS conversion does) stays low.

Why the control trains on one volume and validates on the other: with train = validation a
U-Net memorises even a flipped label map within the same budget (measured: lungs 0.67 with
flipped labels vs 0.72 aligned), so only a held-out volume tells aligned labels from
misaligned ones.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tcsmae.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:case .* has no patient id"),
              pytest.mark.timeout(600)]

FAST = ["--init", "scratch", "--encoder", "mit_b0", "--lr", "3e-3", "--batch-size", "6", "--size", "64",
        "--device", "cpu", "--workers", "0", "--seed", "0"]
LUNG_IDS = [10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def stores(shared_data, tmp_path_factory):
    """Converted stores: `nifti` (small volume), `both` (DICOM + NIfTI), `flipped` (DICOM labels flipped)."""
    from tcsmae.convert.store import StoreWriter, open_store

    root = tmp_path_factory.mktemp("e2e")
    dicom = ["convert", str(shared_data / "totalseg-dicom-series"), "--labels",
             str(shared_data / "totalseg-dicom-series-seg.nii.gz"), "--workers", "1"]
    nifti = ["convert-nifti", str(shared_data / "totalseg-ct-small.nii.gz"), "--labels",
             str(shared_data / "totalseg-ct-small-seg.nii.gz")]
    assert main(dicom + ["-o", str(root / "both.zarr")]) == 0
    assert main(nifti + ["-o", str(root / "both.zarr")]) == 0
    assert main(nifti + ["-o", str(root / "nifti.zarr")]) == 0
    both = open_store(root / "both.zarr")
    assert len(both.case_ids) == 2
    with StoreWriter(root / "flipped.zarr") as w:
        for case_id in both.case_ids:
            labels = both.label(case_id)[:]
            if both.case_attrs(case_id).get("source_format") != "nifti":
                labels = np.ascontiguousarray(labels[:, ::-1, ::-1])
            w.write_case(case_id, both.image(case_id)[:], dict(both.case_attrs(case_id)), labels=labels)
    maps = {}
    for name, classes in {"lung": {"lung": LUNG_IDS}, "liver": {"liver": [5]}}.items():
        maps[name] = root / f"{name}.json"
        maps[name].write_text(json.dumps({"classes": classes}))
    return {"root": root, "nifti": root / "nifti.zarr", "both": root / "both.zarr",
            "flipped": root / "flipped.zarr", "maps": maps}


def _finetune(stores, data: str, label_map: str, out: str, *extra) -> dict:
    out_dir = stores["root"] / out
    code = main(["finetune", "--data", str(stores[data]), "--out", str(out_dir), "--labels-map",
                 str(stores["maps"][label_map]), *FAST, *extra])
    assert code == 0
    return json.loads((out_dir / "results.json").read_text())


def test_lungs_train_equals_val_and_predict_nifti(stores, shared_data, capsys):
    results = _finetune(stores, "nifti", "lung", "lung", "--folds", "1", "--epochs", "15")
    dsc = results["mean"]["classes"]["lung"]["dsc"]
    print(f"lung DSC (NIfTI volume, train = val): {dsc:.3f}")
    assert dsc > 0.6
    assert results["folds"][0]["classes"]["lung"]["hd95_mm"] is not None
    out_dir = stores["root"] / "lung"
    assert (out_dir / "val_dsc.png").stat().st_size > 0
    history = json.loads((out_dir / "fold_0" / "scores.json").read_text())["history"]
    assert len(history) == 15 and history[-1]["val_dsc"] == pytest.approx(dsc, abs=1e-9)

    # predict from the raw NIfTI file: output in the source's own voxel layout and affine
    pred_dir = stores["root"] / "pred"
    assert main(["predict", "--weights", str(out_dir / "fold_0" / "finetuned.pt"), "--nifti",
                 str(shared_data / "totalseg-ct-small.nii.gz"), "-o", str(pred_dir), "--device", "cpu"]) == 0
    src = nib.load(str(shared_data / "totalseg-ct-small-seg.nii.gz"))
    pred = nib.load(str(pred_dir / "totalseg-ct-small.nii.gz"))
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    p = np.asarray(pred.dataobj) == 1
    r = np.isin(np.asarray(src.dataobj), LUNG_IDS)
    file_dsc = 2 * (p & r).sum() / (p.sum() + r.sum())
    assert file_dsc == pytest.approx(dsc, abs=1e-6), "predict must reproduce the validation figure"
    classes = json.loads((pred_dir / "classes.json").read_text())
    assert classes["1"] == {"name": "lung", "stored_ids": LUNG_IDS}


def test_liver_across_volumes_and_flipped_labels_stay_low(stores):
    results = _finetune(stores, "both", "liver", "liver", "--folds", "2", "--epochs", "10")
    per_fold = [f["classes"]["liver"]["dsc"] for f in results["folds"]]
    print(f"liver DSC, trained on one volume, validated on the other: {per_fold}")
    assert len(per_fold) == 2 and min(per_fold) > 0.5 and np.mean(per_fold) > 0.6
    assert results["mean"]["classes"]["liver"]["dsc"] == pytest.approx(np.mean(per_fold))
    folds = json.loads((stores["root"] / "liver" / "folds.json").read_text())["folds"]
    for k, fold in enumerate(folds):  # each volume validated once, by the model trained on the other
        assert fold["train"] != fold["val"] and len(fold["val"]) == 1
        assert results["cases"][fold["val"][0]]["fold"] == k
    # control: train on the DICOM volume with its labels flipped, validate on the NIfTI volume
    flipped = _finetune(stores, "flipped", "liver", "flipped", "--folds", "2", "--fold", "1", "--epochs", "10")
    bad = flipped["folds"][0]["classes"]["liver"]["dsc"]
    print(f"liver DSC with the DICOM label map flipped: {bad:.3f}")
    assert flipped["complete"] is False and len(flipped["folds"]) == 1
    assert bad < 0.25
