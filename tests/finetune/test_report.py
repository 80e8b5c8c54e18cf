"""Report table formatting, fold aggregation and the paired Wilcoxon test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from tcsmae.cli import main
from tcsmae.errors import UserError
from tcsmae.finetune.metrics import fold_summary, mean_std, over_folds
from tcsmae.finetune.report import Run, format_report, load_run, paired_wilcoxon


def _case(dsc_a, hd_a, dsc_b=None, hd_b=None):
    return {"classes": {"a": {"dsc": dsc_a, "hd95_mm": hd_a}, "b": {"dsc": dsc_b, "hd95_mm": hd_b}},
            "groups": {"ab": {"dsc": dsc_a, "hd95_mm": hd_a}}}


def _results(values, label_map_name="toy"):
    """values: per fold, per case (dsc_a, hd_a)."""
    cases, folds = {}, []
    for f, fold_values in enumerate(values):
        recs = []
        for i, (d, h) in enumerate(fold_values):
            rec = _case(d, h)
            cases[f"f{f}c{i}"] = {"fold": f, **rec}
            recs.append(rec)
        folds.append(fold_summary(recs))
    mean, std = over_folds(folds)
    return {"folds": folds, "mean": mean, "std": std, "cases": cases, "config": {},
            "label_map": {"name": label_map_name}}


def test_fold_summary_and_over_folds():
    res = _results([[(0.8, 2.0), (0.6, None)], [(0.5, 4.0), (None, None)]])
    f0, f1 = res["folds"]
    assert f0["classes"]["a"]["dsc"] == pytest.approx(0.7) and f0["classes"]["a"]["hd95_mm"] == 2.0
    assert f0["classes"]["a"]["n_undefined"] == {"dsc": 0, "hd95_mm": 1}
    assert f1["classes"]["a"]["n_undefined"] == {"dsc": 1, "hd95_mm": 1}
    assert f0["classes"]["b"]["dsc"] is None  # never NaN
    m, s = res["mean"]["classes"]["a"], res["std"]["classes"]["a"]
    assert m["dsc"] == pytest.approx(0.6) and s["dsc"] == pytest.approx(0.1)
    assert m["hd95_mm"] == pytest.approx(3.0) and s["hd95_mm"] == pytest.approx(1.0)
    assert m["n_undefined"] == {"dsc": 1, "hd95_mm": 2} and m["n_cases"] == 4
    assert res["mean"]["classes"]["b"]["dsc"] is None
    json.dumps(res, allow_nan=False)  # no NaN anywhere


def _write(tmp_path, name, res):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return d


def _run(results: dict, name: str) -> Run:
    """A Run straight from a results dict (no folder)."""
    return Run(name=name, path=Path(name) / "results.json", results=results)


def test_table_and_wilcoxon(tmp_path):
    rng = np.random.default_rng(3)
    base_vals = rng.uniform(0.5, 0.7, size=(2, 6))
    better = base_vals + rng.uniform(0.05, 0.1, size=base_vals.shape)
    base = _results([[(float(d), 3.0 + i) for i, d in enumerate(fold)] for fold in base_vals])
    tcs = _results([[(float(d), 2.0 + i) for i, d in enumerate(fold)] for fold in better])
    d1, d2 = _write(tmp_path, "scratch", base), _write(tmp_path, "tcsmae", tcs)
    text = format_report([load_run(d1), load_run(d2)], by="groups")
    lines = text.splitlines()
    assert lines[2] == "| Run | ab DSC (%) | ab HD95 (mm) |"
    m, s = base["mean"]["groups"]["ab"]["dsc"], base["std"]["groups"]["ab"]["dsc"]
    assert lines[4] == f"| scratch (2 folds) | {100 * m:.2f} ± {100 * s:.2f} | 5.50 ± 0.00 |"
    assert lines[5].startswith("| tcsmae (2 folds) | ")
    expected_p = wilcoxon(base_vals.ravel(), better.ravel()).pvalue
    p, n = paired_wilcoxon(base["cases"], tcs["cases"], "groups", "ab", "dsc")
    assert n == 12 and p == pytest.approx(expected_p) and p < 0.01
    assert f"| tcsmae | {expected_p:.3g} (n=12) | " in text
    assert "Table III" not in text  # no chest map here
    by_classes = format_report([load_run(d1), load_run(d2)], by="classes")
    assert "| Run | a DSC (%) | a HD95 (mm) | b DSC (%) | b HD95 (mm) |" in by_classes
    assert "n/a" in by_classes  # class b is undefined everywhere


def test_identical_runs_and_missing_values():
    res = _results([[(0.5, 1.0), (None, None), (0.7, 2.0)]])
    assert paired_wilcoxon(res["cases"], res["cases"], "classes", "a", "dsc") == (1.0, 2)
    assert paired_wilcoxon(res["cases"], {}, "classes", "a", "dsc") == (None, 0)


def test_chest11_note_and_cli(tmp_path, capsys):
    res = _results([[(0.9, 1.0)]], label_map_name="chest11")
    d = _write(tmp_path, "run1", res)
    assert main(["report", str(d), "--names", "TCS-MAE", "-o", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "11 classes, not the 16 of the paper's Table III" in out
    assert "| TCS-MAE (1 fold) | 90.00 | 1.00 |" in out  # one fold: no spread to show
    assert (tmp_path / "t.md").read_text() == out


def test_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no results.json"):
        load_run(tmp_path)
    a = _write(tmp_path, "a", _results([[(0.9, 1.0)]]))
    other = _results([[(0.9, 1.0)]])
    other["mean"]["groups"] = {"zz": other["mean"]["groups"]["ab"]}
    b = _write(tmp_path, "b", other)
    with pytest.raises(UserError, match="same --labels-map"):
        format_report([load_run(a), load_run(b)])
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_std_needs_two_defined_folds():
    assert mean_std([0.81]) == (pytest.approx(0.81), None)
    assert mean_std([None, 0.81]) == (pytest.approx(0.81), None)
    assert mean_std([None, None]) == (None, None)
    assert mean_std([0.8, 0.6]) == (pytest.approx(0.7), pytest.approx(0.1))
    # fold 1 has no defined DSC (its structure is absent), so only fold 0 contributes
    res = _results([[(0.81, 2.0)], [(None, None)]])
    assert res["std"]["groups"]["ab"]["dsc"] is None
    row = format_report([_run(res, "run")]).splitlines()[4]
    assert row == "| run (2 folds) | 81.00 (1 fold) | 2.00 (1 fold) |"
    assert "±" not in row
    both = _results([[(0.8, 2.0)], [(0.6, 4.0)]])
    assert format_report([_run(both, "run")]).splitlines()[4] == \
        "| run (2 folds) | 70.00 ± 10.00 | 3.00 ± 1.00 |"
    # an older results.json (std 0.0 over one value) is shown the same way
    res["std"]["groups"]["ab"]["dsc"] = 0.0
    assert "| 81.00 (1 fold) |" in format_report([_run(res, "run")])


def test_allow_overlap_runs_are_marked():
    clean, biased = _results([[(0.8, 2.0)]]), _results([[(0.9, 1.0)]])
    biased["config"] = {"allow_overlap": True}
    text = format_report([_run(clean, "clean"), _run(biased, "biased")])
    assert "| clean (1 fold) |" in text and "| biased (1 fold) † |" in text
    assert "† fine-tuned with --allow-overlap" in text
    assert "†" not in format_report([_run(clean, "clean")])
