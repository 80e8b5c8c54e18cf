"""`tcsmae ablate`'s step logic with a stand-in for the subcommands (no training): which
commands run, which are skipped when done, how an interrupted arm resumes, the summary's
scores and paired tests, the figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tcsmae.ablate.grid import AblateConfig, Arm, Grid, named_grid
from tcsmae.ablate.run import StepFailed, run_grid
from tcsmae.ablate.summary import arm_scores, orderings, paired_test, write_summary

SETTINGS = AblateConfig(encoder="mit_b0", size=64, pretrain_epochs=2, steps_per_epoch=2, pretrain_batch_size=2,
                        epochs=1, batch_size=4, folds=2, lr=1e-3, device="cpu", workers=0,
                        labels_map="phantom-lesion")
CASES = ["c0", "c1", "c2", "c3", "c4", "c5"]


def _arg(argv, name):
    return argv[argv.index(name) + 1]


class FakeCli:
    """Writes what each subcommand leaves behind; DSC per case = base + 0.01 * case + arm offset."""

    def __init__(self, offsets: dict[str, float] | None = None, fail: tuple[str, str] | None = None,
                 code: int = 130):
        self.calls: list[list[str]] = []
        self.offsets = offsets or {}
        self.fail, self.code = fail, code  # fail: (command, a path part of its arguments), once

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(list(argv))
        cmd = argv[0]
        if self.fail and cmd == self.fail[0] and self.fail[1] in " ".join(argv):
            self.fail = None
            return self.code
        if cmd == "pretrain":
            ckpt = Path(_arg(argv, "--out")) / "checkpoints" / "last.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text("checkpoint")
        elif cmd == "export":
            weights = Path(_arg(argv, "-o"))
            weights.write_text("weights")
            weights.with_suffix(".json").write_text(json.dumps({"trained": {"steps_done": 4}}))
        elif cmd == "finetune":
            out = Path(_arg(argv, "--out"))
            arm = out.name.rsplit("-", 1)[0]
            off = self.offsets.get(arm, 0.0)
            cases = {c: {"fold": i % 2, "classes": {"lesion": {"dsc": 0.3 + 0.01 * i + off}}}
                     for i, c in enumerate(CASES)}
            folds = [{"fold": k, "classes": {"lesion": {"dsc": sum(
                v["classes"]["lesion"]["dsc"] for v in cases.values() if v["fold"] == k) / 3}}} for k in (0, 1)]
            out.mkdir(parents=True, exist_ok=True)
            (out / "folds.json").write_text(json.dumps({"folds": [CASES[0::2], CASES[1::2]]}))
            (out / "results.json").write_text(json.dumps({
                "complete": True, "folds": folds, "cases": cases,
                "mean": {"classes": {"lesion": {"dsc": 0.3}}, "groups": {}}, "std": {}}))
        elif cmd == "report":
            Path(_arg(argv, "-o")).write_text("| report |\n")
        return 0

    def commands(self):
        return [" ".join([c[0]] + ([Path(_arg(c, "--out")).name.rsplit("-", 1)[0]] if "--out" in c else [])) for c in self.calls]


@pytest.fixture
def stores(tmp_path):
    (tmp_path / "pre.zarr").mkdir()
    (tmp_path / "lab.zarr").mkdir()
    return tmp_path / "pre.zarr", tmp_path / "lab.zarr"


def _grid():
    return Grid("two", (Arm("scratch", "scratch"), Arm("mae", "mae", paper=(70.25, 68.10)),
                        Arm("tcs-mae", "tcs-mae", paper=(71.04, 72.78))))


def test_first_run_then_nothing_but_the_report(stores, tmp_path):
    out = tmp_path / "out"
    cli = FakeCli()
    runs = run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=cli)
    assert cli.commands() == ["finetune scratch", "pretrain mae", "export", "finetune mae", "pretrain tcs-mae",
                              "export", "finetune tcs-mae", "report"]
    pretrain = cli.calls[1]
    request = json.loads(Path(_arg(pretrain, "--config")).read_text())
    assert request["pipeline"]["masking"] == "patch" and request["model"]["branches"] == "masked"
    assert _arg(pretrain, "--data") == str(stores[0])
    finetune = cli.calls[3]
    assert _arg(finetune, "--init") == str(runs[1].pretrain_dir / "weights.pt")
    assert [_arg(c, "--seed") for c in cli.calls if c[0] == "finetune"] == ["0"] * 3  # same seed: same folds
    assert _arg(cli.calls[0], "--init") == "scratch" and _arg(cli.calls[0], "--encoder") == "mit_b0"
    assert "--encoder" not in finetune  # from weights.json
    again = FakeCli()
    run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=again)
    assert again.commands() == ["report"]  # a finished arm is never recomputed


def test_an_interrupted_pretraining_resumes_from_its_checkpoint(stores, tmp_path):
    out = tmp_path / "out"
    first = FakeCli(fail=("export", "/tcs-mae-"), code=130)  # killed between pretraining and export
    with pytest.raises(StepFailed, match="step 'export tcs-mae' was interrupted.*run the same `tcsmae ablate`") as err:
        run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=first)
    assert err.value.exit_code == 130
    second = FakeCli()
    run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=second)
    assert second.commands() == ["pretrain tcs-mae", "export", "finetune tcs-mae", "report"]
    resume = second.calls[0]
    assert resume[:2] == ["pretrain", "--resume"] and resume[2].endswith("checkpoints/last.pt")
    assert _arg(resume, "--epochs") == "2"  # the asked-for total, whatever the checkpoint says
    failing = FakeCli(fail=("finetune", "/scratch-"), code=2)
    with pytest.raises(StepFailed, match="failed with exit code 2"):
        run_grid(_grid(), replace(SETTINGS, lr=1e-2), *stores, out,
                 say=lambda s: None, runner=failing)


def test_other_folds_in_one_arm_are_refused(stores, tmp_path):
    out = tmp_path / "out"
    run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=FakeCli())
    folds = next((out / "finetune").glob("mae-*")) / "folds.json"
    folds.write_text(json.dumps({"folds": [CASES[:3], CASES[3:]]}))
    with pytest.raises(Exception, match="different folds"):
        run_grid(_grid(), SETTINGS, *stores, out, say=lambda s: None, runner=FakeCli())


def test_summary_scores_tests_orderings_and_figures(stores, tmp_path):
    out = tmp_path / "out"
    grid = Grid("k-rho", (Arm("scratch", "scratch", paper=(66.23, 62.42)),
                          Arm("k4", "tcs-mae", overrides={"pipeline": {"intervals": 4}}),
                          Arm("tcs-mae", "tcs-mae", paper=(71.04, 72.78)),
                          Arm("mae", "mae", paper=(70.25, 68.10))))
    cli = FakeCli(offsets={"tcs-mae": 0.1, "k4": 0.05, "mae": -0.02})
    runs = run_grid(grid, SETTINGS, *stores, out, say=lambda s: None, runner=cli)
    doc = write_summary(runs, grid.name, SETTINGS, stores[0], stores[1], out, {"finetune scratch": 3.0})
    arms = {a["name"]: a for a in doc["arms"]}
    assert arms["tcs-mae"]["dsc_mean"] == pytest.approx(0.3 + 0.025 + 0.1)
    assert arms["tcs-mae"]["dsc_std"] == pytest.approx(0.01 / 2)  # fold means 0.02 vs 0.03 (+ offsets)
    assert arms["tcs-mae"]["n_cases"] == 6 and arms["tcs-mae"]["p_vs_scratch"] == pytest.approx(0.03125)
    assert arms["scratch"]["p_vs_scratch"] is None
    assert arms["tcs-mae"]["settings"]["K"] == 8 and arms["k4"]["settings"]["K"] == 4
    assert arms["mae"]["settings"]["masking"] == "patch" and arms["mae"]["pretraining_steps"] == 4
    pairs = {(o["a"], o["b"]): o for o in doc["orderings"]}
    assert set(pairs) == {("scratch", "tcs-mae"), ("scratch", "mae"), ("tcs-mae", "mae")}
    tm = pairs[("tcs-mae", "mae")]
    assert (tm["paper_pneumonia"], tm["paper_mediastinal"], tm["here"]) == (-1, -1, -1)  # tcs-mae > mae
    assert doc["figures"] == ["dsc_by_arm.png", "dsc_k_rho.png"]
    for f in doc["figures"]:
        assert (out / f).stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert "| tcs-mae vs mae | tcs-mae > mae | tcs-mae > mae | tcs-mae > mae | 0.0312 (n=6) |" in text
    assert "| report |" in text and "![dsc_k_rho.png](dsc_k_rho.png)" in text
    assert json.loads((out / "results.json").read_text())["grid"] == "k-rho"


def test_scores_use_groups_or_classes_and_skip_undefined_values():
    results = {"folds": [{"classes": {"a": {"dsc": 0.2}, "b": {"dsc": None}}, "groups": {"g": {"dsc": 0.4}}},
                         {"classes": {"a": {"dsc": 0.4}, "b": {"dsc": 0.6}}, "groups": {"g": {"dsc": 0.6}}}],
               "mean": {"groups": {"g": {}}}, "cases": {"x": {"classes": {"a": {"dsc": None}}}}}
    by_class = arm_scores(results, "classes")
    assert by_class["folds"] == pytest.approx([0.2, 0.5]) and by_class["cases"] == {}
    assert by_class["std"] == pytest.approx(0.15)
    assert arm_scores(results, "groups")["folds"] == pytest.approx([0.4, 0.6])
    no_groups = {**results, "mean": {"groups": {}}}
    assert arm_scores(no_groups, "groups")["by"] == "classes"
    assert paired_test({"x": 0.1}, {"y": 0.2}) == (None, 0)
    assert paired_test({"x": 0.1, "y": 0.2}, {"x": 0.1, "y": 0.2}) == (1.0, 2)
    assert orderings([], {}) == []


def test_named_grids_through_the_fake_runner_cover_every_arm(stores, tmp_path):
    cli = FakeCli()
    run_grid(named_grid("table5"), SETTINGS, *stores, tmp_path / "out", say=lambda s: None, runner=cli)
    pretrained = [json.loads(Path(_arg(c, "--config")).read_text())["model"]["mep_levels"]
                  for c in cli.calls if c[0] == "pretrain"]
    assert pretrained == [[], [5], [4, 5], [3, 4, 5]]
