"""Presets, JSON config files, command-line layering and the default-data cache."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from dataclasses import asdict

import pytest

from tcsmae.case_digests import pretraining_case_digests
from tcsmae.errors import UserError
from tcsmae.phantom import store as phantom_store
from tcsmae.plain import to_plain
from tcsmae.pretrain import command as pretrain_cmd
from tcsmae.pretrain.config import (
    LossConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_config_file,
    parse_mep_levels,
    preset,
)


def parse(*argv):
    parser = ArgumentParser()
    pretrain_cmd.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_paper_preset_is_the_papers_configuration():
    cfg = preset("paper")
    assert (cfg.model.encoder, cfg.input_size, cfg.batch_size, cfg.lr, cfg.lr_gamma, cfg.epochs) == \
        ("mit_b2", 256, 30, 1e-4, 0.96, 60)
    assert cfg.model.mep_levels == (4, 5) and cfg.model.projection_dim == 128
    assert cfg.loss == LossConfig() and cfg.loss.temperature_init == 0.07 and cfg.loss.weight == 1.0
    assert cfg.pipeline.masking == "tissue" and cfg.pipeline.intervals == 8 and cfg.pipeline.rho == 0.75
    demo = preset("demo")
    assert demo.model.encoder == "mit_b0" and demo.input_size == 128
    assert 100 <= demo.epochs * demo.steps_per_epoch <= 1000
    with pytest.raises(UserError, match="paper"):
        preset("huge")


def test_config_round_trips_through_plain_dicts():
    cfg = preset("demo")
    plain = to_plain(cfg)
    json.dumps(plain)  # JSON-safe
    assert config_from_dict(plain) == cfg
    assert config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


def test_json_file_overrides_and_names_bad_keys(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"epochs": 3, "model": {"mep_levels": [5]}, "pipeline": {"rho": 0.35}}))
    cfg = load_config_file(good, preset("paper"))
    assert cfg.epochs == 3 and cfg.model.mep_levels == (5,) and cfg.pipeline.rho == 0.35
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"encodr": "mit_b0"}}))
    with pytest.raises(UserError, match=r"bad.json.*'encodr'.*encoder"):
        load_config_file(bad, preset("paper"))
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(tmp_path / "missing.json", preset("paper"))


def test_config_checks_name_the_fix():
    with pytest.raises(UserError, match="multiple of 32"):
        TrainConfig(pipeline=preset("paper").pipeline.__class__(size=100))
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="ntxent"):
        LossConfig(contrastive="infonce")
    with pytest.raises(UserError, match="odd"):
        LossConfig(ssim_window=10)
    with pytest.raises(UserError, match="projection"):
        ModelConfig(projection="avg")


def test_command_line_layers_preset_variant_file_and_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "batch_size": 12}))
    args = parse("--preset", "demo", "--variant", "authors", "--config", f, "--batch-size", 5,
                 "--masking", "patch", "--seed", 3)
    cfg = pretrain_cmd.build_config(args)
    assert cfg.model.encoder == "mit_b0" and cfg.epochs == 7 and cfg.batch_size == 5  # flag beats file
    assert cfg.loss.contrastive == "cosine" and cfg.model.projection == "maxpool"
    assert cfg.model.mep_levels == (3, 4, 5) and cfg.loss.ssim_window == 15
    assert cfg.pipeline.masking == "patch" and cfg.seed == cfg.pipeline.seed == 3
    stored = to_plain(preset("demo"))  # a resume starts from the checkpoint's config
    cfg = pretrain_cmd.build_config(parse("--epochs", 9), stored=stored)
    assert cfg.model.encoder == "mit_b0" and cfg.epochs == 9


@pytest.mark.parametrize("tokens,levels", [(["none"], ()), (["F5"], (5,)), (["F4", "F5"], (4, 5)),
                                           (["3,4,5"], (3, 4, 5))])
def test_mep_levels_flag(tokens, levels):
    assert parse_mep_levels(tokens) == levels


def test_default_data_is_built_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCSMAE_CACHE", str(tmp_path))
    monkeypatch.setattr(phantom_store, "DEFAULT_CASES", 1)
    monkeypatch.setattr(phantom_store, "DEFAULT_SLICES", 4)
    monkeypatch.setattr(phantom_store, "DEFAULT_SIZE", 64)
    said = []
    store = phantom_store.default_store(True, said.append)
    assert store == tmp_path / phantom_store.PHANTOM_VERSION / "phantom.zarr"
    from tcsmae.store.reader import open_store

    assert open_store(store).n_slices == 4
    assert "building the embedded phantom default" in said[0]
    said.clear()
    assert phantom_store.default_store(True, said.append) == store
    assert "training on the embedded phantom default" in said[0]  # reused, not rebuilt
    digests = pretraining_case_digests(store)
    assert digests["n_cases"] == 1 and len(digests["salt"]) == 32
    assert len(digests["series_digests"]) == len(digests["patient_digests"]) == 1
    from tcsmae.finetune.folds import check_leakage

    s = open_store(store)
    cases = {c: s.case_attrs(c) for c in s.case_ids}
    with pytest.raises(UserError, match="overlap"):
        check_leakage(cases, digests, allow_overlap=False)


def test_start_summary_notes_surprising_settings():
    import torch

    from tcsmae.distributed import DistContext

    cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    paper = pretrain_cmd.start_summary(preset("paper"), cpu, "s.zarr", 40)
    assert "mit_b2 at 256x256" in paper and "60 epoch(s) of 40 step(s)" in paper
    assert "full-size configuration on the CPU" in paper
    demo = pretrain_cmd.start_summary(preset("demo"), cpu, "s.zarr", 3, asked_steps=None)
    assert "note" not in demo  # the demo preset's own step cap is not the user's doing
    asked = pretrain_cmd.start_summary(preset("demo"), cpu, "s.zarr", 3, asked_steps=7)
    assert "--steps-per-epoch 7 is more than that: an epoch stops after 3" in asked


@pytest.mark.parametrize("bad,message", [
    ({"lr": "1e-3"}, 'lr = "1e-3" is not a number'),
    ({"batch_size": 2.5}, "batch_size = 2.5 is not an integer"),
    ({"pipeline": {"lung_window": [-500]}}, "lung_window = \\[-500\\] is not a list of 2 numbers"),
    ({"pipeline": {"intervals": True}}, "intervals = true is not an integer"),
    ({"model": {"mep_levels": [4, "5"]}}, "mep_levels .* is not a list of integers"),
    ({"pipeline": 7}, "pipeline: 7 must be a JSON object"),
])
def test_config_file_values_are_type_checked(tmp_path, bad, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=message):
        load_config_file(path, preset("paper"))


def test_config_file_numbers_are_converted_to_the_field_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 1, "model": {"mep_levels": [5], "encoder_weights": None},
                                "pipeline": {"lung_window": [-400, 1000]}}))
    cfg = load_config_file(path, preset("paper"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model.mep_levels == (5,) and cfg.pipeline.lung_window == (-400.0, 1000.0)


def test_resuming_on_another_number_of_ranks_is_announced():
    assert pretrain_cmd.world_size_note(2, 2, 30, True) is None
    assert pretrain_cmd.world_size_note(None, 1, 30, True) is None  # an old checkpoint: unknown
    note = pretrain_cmd.world_size_note(2, 1, 8, mid_epoch=True)
    assert "from 16 to 8" in note and "sharded anew" in note and "resume on 2 rank(s)" in note
    assert "sharded anew" not in pretrain_cmd.world_size_note(1, 4, 8, mid_epoch=False)


# ----------------------------------------------------------------------------- flags derived from the fields

HAND_WRITTEN = ("--data", "--out", "--preset", "--variant", "--config", "--resume", "--objective")
DERIVED = ("--epochs", "--steps-per-epoch", "--batch-size", "--size", "--encoder", "--device", "--precision",
           "--masking", "--rho", "--mep-levels", "--lr", "--seed", "--checkpoint-every", "--log-every",
           "--workers", "--compile", "--no-compile", "--lr-scale", "--mep-head", "--branches", "--branch-forward",
           "--intervals")


def test_every_field_with_a_flag_is_in_the_help_with_its_docstring():
    from dataclasses import fields

    from tcsmae.pipelines.config import PipelineConfig
    from tcsmae.settings import field_docs

    parser = ArgumentParser()
    pretrain_cmd.add_arguments(parser)
    text = parser.format_help()
    squeezed = "".join(text.split())  # argparse rewraps (and splits long words)
    flagged = 0
    for cls in (TrainConfig, ModelConfig, LossConfig, PipelineConfig):
        for f in fields(cls):
            if "flag" in f.metadata:
                flagged += 1
                assert f.metadata["flag"]["name"] in text, f.name
                assert "".join(field_docs(cls)[f.name].split()) in squeezed, f.name
    assert flagged == len(DERIVED) - 1  # --no-compile comes with --compile
    for name in HAND_WRITTEN + DERIVED:
        assert name in text, name
    words = " ".join(text.split())
    assert "Slices per rank per step (the paper: 30 on one GPU). (default: 30)" in words  # the real default
    assert "(default: --no-compile)" in words and "(default: 4 5)" in words


def test_no_flags_give_the_preset_and_flags_beat_the_config_file(tmp_path):
    assert pretrain_cmd.build_config(parse()) == preset("paper")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"compile": True, "model": {"mep_levels": [5]}}))
    assert pretrain_cmd.build_config(parse("--config", f)).compile is True
    cfg = pretrain_cmd.build_config(parse("--config", f, "--no-compile", "--mep-levels", "F3", "F4", "F5"))
    assert cfg.compile is False and cfg.model.mep_levels == (3, 4, 5)
    assert pretrain_cmd.build_config(parse("--compile")).compile is True
    assert pretrain_cmd.build_config(parse("--mep-levels", "none")).model.mep_levels == ()
    cfg = pretrain_cmd.build_config(parse("--size", 128, "--rho", 0.35, "--encoder", "mit_b0", "--lr", 1e-3))
    assert (cfg.input_size, cfg.pipeline.rho, cfg.model.encoder, cfg.lr) == (128, 0.35, "mit_b0", 1e-3)


def test_choices_are_refused_with_the_valid_list(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("--masking", "random")
    assert "invalid choice: 'random' (choose from 'tissue', 'patch', 'none')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--precision", "fp8")
    assert "'auto', 'bf16', 'fp16', 'fp32'" in capsys.readouterr().err
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"pipeline": {"masking": "random"}}))
    with pytest.raises(UserError, match=r'c.json.pipeline: masking = "random" is not one of "tissue", "patch", '
                                        r'"none" \(now "tissue"\)'):
        load_config_file(path, preset("paper"))


def test_a_config_file_value_of_the_wrong_type_names_key_value_and_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"projection_dim": "128"}}))
    with pytest.raises(UserError, match=r'c.json.model: projection_dim = "128" is not an integer \(now 128\)'):
        load_config_file(path, preset("paper"))
    path.write_text(json.dumps({"compile": "yes"}))
    with pytest.raises(UserError, match=r'compile = "yes" is not a boolean \(true/false\) \(now false\)'):
        load_config_file(path, preset("paper"))


@pytest.mark.parametrize("name, masking, branches, levels", [
    ("ae", "none", "masked", ()), ("mae", "patch", "masked", ()),
    ("patch-unmask", "patch", "both", (4, 5)), ("tcs-mae", "tissue", "both", (4, 5))])
def test_objective_flag_sets_the_named_objective_and_later_flags_still_apply(name, masking, branches, levels):
    cfg = pretrain_cmd.build_config(parse("--objective", name))
    assert (cfg.pipeline.masking, cfg.model.branches, cfg.model.mep_levels) == (masking, branches, levels)
    assert pretrain_cmd.build_config(parse("--objective", name, "--mep-levels", "F5")).model.mep_levels == (5,)
    with pytest.raises(SystemExit):
        parse("--objective", "simclr")


def test_intervals_flag_sets_k_of_the_tissue_mask():
    cfg = pretrain_cmd.build_config(parse("--intervals", 6, "--rho", 0.35))
    assert (cfg.pipeline.intervals, cfg.pipeline.rho, cfg.pipeline.n_masked_intervals) == (6, 0.35, 2)
