"""`tcsmae ablate`'s grids and settings: the paper's named grids, JSON grids and their errors,
each arm's pretraining config, and the folder keys that make a finished arm findable."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tcsmae.ablate.grid import (
    FIG7_K,
    FIG7_RHO,
    AblateConfig,
    Arm,
    Grid,
    finetune_key,
    load_grid,
    named_grid,
    pretrain_key,
    train_config,
)
from tcsmae.errors import UserError
from tcsmae.settings import apply_settings

TINY = AblateConfig(encoder="mit_b0", size=64, pretrain_epochs=2, steps_per_epoch=3, pretrain_batch_size=2,
                    epochs=1, batch_size=4, folds=2, lr=1e-3, device="cpu", workers=0)


def _arms(grid):
    return {a.name: a for a in grid.arms}


def test_table2_rows_and_their_objectives():
    grid = named_grid("table2")
    assert [a.name for a in grid.arms] == ["scratch", "ae", "mae", "mae-con", "tcs-mae"]
    cfgs = {a.name: train_config(a, TINY) for a in grid.arms if a.pretrained}
    got = {n: (c.pipeline.masking, c.model.branches, c.model.mep_levels) for n, c in cfgs.items()}
    assert got == {"ae": ("none", "masked", ()), "mae": ("patch", "masked", ()),
                   "mae-con": ("patch", "masked", (4, 5)), "tcs-mae": ("tissue", "both", (4, 5))}
    for c in cfgs.values():  # the size settings reach every arm
        assert (c.model.encoder, c.input_size, c.epochs, c.steps_per_epoch, c.batch_size) == ("mit_b0", 64, 2, 3, 2)
        assert c.lr == 1e-4 and c.seed == c.pipeline.seed == 0 and c.image_every == 0
    assert _arms(grid)["tcs-mae"].paper == (71.04, 72.78) and _arms(grid)["scratch"].paper == (66.23, 62.42)


def test_table4_table5_and_fig7():
    t4 = {n: train_config(a, TINY) for n, a in _arms(named_grid("table4")).items() if a.pretrained}
    assert {n: (c.pipeline.masking, c.model.branches) for n, c in t4.items()} == {
        "patch-unmask": ("patch", "both"), "tcs-mae": ("tissue", "both")}
    assert t4["patch-unmask"].model.mep_levels == t4["tcs-mae"].model.mep_levels == (4, 5)
    t5 = {n: train_config(a, TINY).model.mep_levels for n, a in _arms(named_grid("table5")).items() if a.pretrained}
    assert t5 == {"scales-0": (), "scales-1": (5,), "tcs-mae": (4, 5), "scales-3": (3, 4, 5)}
    fig7 = named_grid("fig7")
    assert len(fig7.arms) == 1 + len(FIG7_K) * len(FIG7_RHO)
    cells = {(c.pipeline.intervals, c.pipeline.rho) for c in (train_config(a, TINY) for a in fig7.arms if a.pretrained)}
    assert cells == {(k, r) for k in FIG7_K for r in FIG7_RHO}
    # the same arm under the same name in every grid: one pretraining serves them all
    keys = {pretrain_key(_arms(named_grid(g))["tcs-mae"], train_config(_arms(named_grid(g))["tcs-mae"], TINY), "s.zarr")
            for g in ("table2", "table4", "table5", "fig7")}
    assert len(keys) == 1


def test_keys_follow_what_the_result_depends_on(tmp_path):
    arm = named_grid("table2").arms[-1]
    key = pretrain_key(arm, train_config(arm, TINY), tmp_path / "a.zarr")
    assert key.startswith("tcs-mae-") and key == pretrain_key(arm, train_config(arm, TINY), tmp_path / "a.zarr")
    runtime = replace(TINY, device="auto", workers=3)
    assert pretrain_key(arm, train_config(arm, runtime), tmp_path / "a.zarr") == key  # how, not what
    for change in ({"size": 96}, {"pretrain_epochs": 3}, {"seed": 1}, {"encoder": "mit_b1"}):
        other = replace(TINY, **change)
        assert pretrain_key(arm, train_config(arm, other), tmp_path / "a.zarr") != key, change
    assert pretrain_key(arm, train_config(arm, TINY), tmp_path / "b.zarr") != key
    ft = finetune_key(arm, key, TINY, tmp_path / "l.zarr")
    assert ft == finetune_key(arm, key, TINY, tmp_path / "l.zarr")
    assert ft != finetune_key(arm, key, replace(TINY, lr=1e-4), tmp_path / "l.zarr")
    scratch = named_grid("table2").arms[0]
    assert finetune_key(scratch, None, TINY, "l.zarr") != finetune_key(
        scratch, None, replace(TINY, encoder="mit_b1"), "l.zarr")


def test_json_grid_gets_a_scratch_baseline_first(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"arms": [
        {"name": "k6", "objective": "tcs-mae", "overrides": {"pipeline": {"intervals": 6, "rho": 0.35}},
         "label": "K 6"},
        {"name": "mae-con", "objective": "mae", "contrastive": True},
    ]}))
    grid = load_grid(str(path))
    assert grid.name == "mine" and [a.name for a in grid.arms] == ["scratch", "k6", "mae-con"]
    k6 = train_config(grid.arms[1], TINY)
    assert (k6.pipeline.intervals, k6.pipeline.rho, k6.pipeline.masking) == (6, 0.35, "tissue")
    assert train_config(grid.arms[2], TINY).model.mep_levels == (4, 5)
    assert [a.name for a in grid.select(["mae-con"]).arms] == ["scratch", "mae-con"]
    with pytest.raises(UserError, match="--arms nope: not in grid mine"):
        grid.select(["nope"])


def test_pretrain_config_file_reaches_every_arm_before_the_objective(tmp_path):
    f = tmp_path / "common.json"
    f.write_text(json.dumps({"model": {"projection": "pool", "branch_forward": "separate"},
                             "pipeline": {"masking": "none"}}))
    settings = replace(TINY, pretrain_config=str(f))
    for arm in named_grid("table2").arms[1:]:
        cfg = train_config(arm, settings)
        assert cfg.model.projection == "maxpool" and cfg.model.branch_forward == "separate"
        assert cfg.pipeline.masking == train_config(arm, TINY).pipeline.masking  # the objective decides


@pytest.mark.parametrize("doc,match", [
    ({"arms": [{"name": "x", "objective": "cmae"}]}, "objective 'cmae' is unknown"),
    ({"arms": [{"name": "x", "objective": "mae"}, {"name": "x", "objective": "ae"}]}, "more than once"),
    ({"arms": [{"name": "a b", "objective": "mae"}]}, "names folders"),
    ({"arms": [{"name": "x", "objective": "mae", "ratio": 1}]}, "unknown keys: \\['ratio'\\]"),
    ({"arms": [{"name": "x"}]}, "needs \"name\" and \"objective\""),
    ({"arms": [{"name": "s", "objective": "scratch"}]}, "no pretrained arm"),
    ({"arms": [{"name": "s", "objective": "scratch", "contrastive": True}]}, "not pretrained"),
    ({"grid": []}, "list \"arms\""),
])
def test_bad_json_grids_are_user_errors(tmp_path, doc, match):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=match):
        load_grid(str(path))


def test_bad_overrides_surface_when_the_arm_is_configured_and_other_errors():
    arm = Arm("x", "mae", overrides={"model": {"heads": 3}})
    with pytest.raises(UserError, match="arm x overrides.*unknown key 'heads'"):
        train_config(arm, TINY)
    with pytest.raises(UserError, match="--grid table9: neither one of"):
        load_grid("table9")
    with pytest.raises(UserError, match="--folds 0: must be >= 1"):
        apply_settings(AblateConfig(), {"folds": 0}, where="flags")
    with pytest.raises(UserError, match="--size 100"):
        AblateConfig(size=100)
    with pytest.raises(UserError, match="more than one scratch"):
        Grid("g", (Arm("s1", "scratch"), Arm("s2", "scratch"), Arm("m", "mae")))
