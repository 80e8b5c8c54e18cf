"""tcsmae.weights, the one reader of exported weights (NAME.pt + NAME.json), and predict's
conversion of raw sources in a child process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.weights import (
    FINETUNED_FORMAT,
    PRETRAINED_FORMAT,
    load_finetuned,
    load_pretrained,
    pipeline_from_metadata,
    recorded_pipeline,
    weights_metadata,
)


def _unet(classes: int):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet(encoder_name="mit_b0", encoder_weights=None, in_channels=3, classes=classes)


def _write(path, classes: int, meta: dict):
    torch.save(_unet(classes).state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"encoder": "mit_b0", **meta}))
    return path


def test_pretrained_and_finetuned_told_apart(tmp_path):
    pipe = {"masking": "patch", "size": 64, "lung_window": [-600.0, 1500.0], "not_a_field": 1}
    old = _write(tmp_path / "old.pt", 3, {"classes": 3, "config": {"pipeline": pipe}})  # no `format`
    model, meta, cfg = load_pretrained(old)
    assert not model.training and meta["classes"] == 3
    assert cfg == PipelineConfig(masking="patch", size=64, lung_window=(-600.0, 1500.0), augment=False)
    new = _write(tmp_path / "weights.pt", 3, {"format": PRETRAINED_FORMAT, "classes": 3})
    assert load_pretrained(new)[2] == PipelineConfig()
    with pytest.raises(UserError, match="is not fine-tuned model metadata.*tcsmae finetune"):
        load_finetuned(new)

    ft = _write(tmp_path / "finetuned.pt", 3, {"format": FINETUNED_FORMAT, "classes": 3,
                                               "pipeline": {"masking": "none", "size": 32}})
    model, meta = load_finetuned(ft)
    assert model.segmentation_head[0].out_channels == 3 and recorded_pipeline(meta).size == 32
    with pytest.raises(UserError, match="fine-tuned model.*tcsmae export"):
        load_pretrained(ft)  # a 3-class fine-tuned model is no reconstruction model either
    two = _write(tmp_path / "two.pt", 2, {"classes": 2})
    with pytest.raises(UserError, match="2-channel head"):
        load_pretrained(two)


def test_missing_and_broken_files_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such file.*tcsmae export"):
        load_pretrained(tmp_path / "none.pt")
    with pytest.raises(UserError, match=r"no such file.*DIR/fold_K/finetuned\.pt"):
        load_finetuned(tmp_path / "none.pt")
    with pytest.raises(UserError, match="--init .*no such file.*'scratch'"):
        weights_metadata(str(tmp_path / "none.pt"))
    assert weights_metadata("scratch") == {}
    bare = tmp_path / "bare.pt"
    torch.save(_unet(3).state_dict(), bare)
    with pytest.raises(UserError, match=r"bare\.json is missing"):
        weights_metadata(str(bare))
    bare.with_suffix(".json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON.*re-run `tcsmae export`"):
        load_pretrained(bare)
    bare.with_suffix(".json").write_text(json.dumps({"encoder": "mit_b0"}))
    bare.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot be read as a state dict"):
        load_pretrained(bare)


def test_pipeline_from_metadata_turns_masking_off():
    meta = {"config": {"pipeline": {"masking": "tissue", "rho": 0.5, "augment": True, "scale_range": [0.8, 1.2]}}}
    cfg = pipeline_from_metadata(meta, 96)
    assert cfg == PipelineConfig(masking="none", rho=0.5, size=96, augment=False, scale_range=(0.8, 1.2))
    assert pipeline_from_metadata({}, 64) == PipelineConfig(masking="none", size=64)
    assert pipeline_from_metadata({"pipeline": {"rho": 0.25}}, 32).rho == 0.25  # fine-tuned JSON


def test_export_writes_the_shared_format():
    from tcsmae.pretrain.export import export_metadata

    pipe = {"lung_window": [-500.0, 1200.0], "mediastinal_window": [30.0, 300.0], "edge_scaling": "clip",
            "edge_clip": 1.0, "hu_range": [-1000.0, 500.0], "intervals": 8, "rho": 0.75, "masking": "tissue"}
    ckpt = {"config": {"pipeline": pipe, "model": {"encoder": "mit_b0", "mep_levels": 2}}, "input_size": 64,
            "epoch": 1, "step": 2, "temperature": 0.1}
    meta = export_metadata(ckpt)
    assert meta["format"] == "tcsmae-weights" == PRETRAINED_FORMAT and FINETUNED_FORMAT == "tcsmae-finetuned"
    assert meta["channels"] == ["lung", "mediastinal", "edge"]


def test_predict_converts_in_a_child_process(tmp_path):
    from tcsmae.finetune.predict import _convert_to_store

    not_nifti = tmp_path / "scan.txt"
    not_nifti.write_text("hello")
    with pytest.raises(UserError, match=r"scan\.txt is not a NIfTI file"):
        _convert_to_store(None, not_nifti, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--dicom .*empty: no CT series could be converted"):
        _convert_to_store(tmp_path / "empty", None, tmp_path)


def test_cli_and_predict_do_not_import_convert():
    code = ("import sys, tcsmae.cli, tcsmae.finetune.predict; tcsmae.cli._own_dirs(); "
            "assert 'tcsmae.convert' not in sys.modules, sorted(m for m in sys.modules if 'convert' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
