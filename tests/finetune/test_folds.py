"""Patient-grouped folds and the leakage guard."""

from __future__ import annotations

import json

import pytest

from tcsmae.case_digests import salted_digest
from tcsmae.errors import UserError
from tcsmae.finetune.folds import check_leakage, make_folds, write_folds


def _cases():
    # 12 cases of 7 patients, two cases with no patient id
    cases = [f"c{i:02d}" for i in range(12)]
    patients = ["p1", "p1", "p2", "p3", "p3", "p3", "p4", "", "p5", "p6", "", "p2"]
    return cases, patients


@pytest.mark.filterwarnings("ignore:case .* has no patient id")
def test_folds_deterministic_disjoint_grouped():
    cases, patients = _cases()
    with pytest.warns(UserWarning, match="no patient id"):
        folds, msgs = make_folds(cases, patients, k=3, seed=7)
    assert len(msgs) == 2 and any("c07" in m for m in msgs) and any("c10" in m for m in msgs)
    again, _ = make_folds(cases, patients, k=3, seed=7)
    assert folds == again
    vals = [set(f.val) for f in folds]
    assert set().union(*vals) == set(cases) and sum(map(len, vals)) == len(cases)
    for f in folds:
        assert set(f.train) | set(f.val) == set(cases) and not set(f.train) & set(f.val)
    patient_of = dict(zip(cases, patients))
    for p in {p for p in patients if p}:
        holding = [i for i, v in enumerate(vals) if any(patient_of[c] == p for c in v)]
        assert len(holding) == 1, f"patient {p} in folds {holding}"
    # balanced to within the largest patient group (3 cases)
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 3
    others = {tuple(f.val) for s in range(6) for f in make_folds(cases, patients, 3, s)[0]}
    assert len(others) > 3, "the seed must change the split"


def test_empty_patient_is_own_group():
    cases = ["a", "b", "c", "d"]
    with pytest.warns(UserWarning):
        folds, _ = make_folds(cases, ["", "", "", ""], k=4, seed=0)
    assert sorted(len(f.val) for f in folds) == [1, 1, 1, 1]


def test_fold_one_and_bad_k(tmp_path):
    cases, patients = ["a", "b"], ["x", "y"]
    (f,), _ = make_folds(cases, patients, 1, 0)
    assert f.train == f.val == ("a", "b")
    with pytest.raises(UserError, match="only 2 patient group"):
        make_folds(cases, patients, 3, 0)
    with pytest.raises(UserError, match="at least 1"):
        make_folds(cases, patients, 0, 0)


def test_folds_json_written_and_resume_must_match(tmp_path):
    cases, patients = ["a", "b", "c"], ["x", "y", "z"]
    folds, msgs = make_folds(cases, patients, 3, 0)
    path = write_folds(tmp_path, folds, 3, 0, msgs)
    doc = json.loads(path.read_text())
    assert doc["k"] == 3 and [f["val"] for f in doc["folds"]] == [list(f.val) for f in folds]
    write_folds(tmp_path, folds, 3, 0, msgs)  # same folds: fine
    other, _ = make_folds(cases, patients, 1, 0)
    with pytest.raises(UserError, match="different folds"):
        write_folds(tmp_path, other, 1, 0, [])


def test_leakage_guard_refuses_overlap():
    salt = "s3cr3t"
    pre = {"salt": salt, "series_digests": [salted_digest(salt, "1.2.3")],
           "patient_digests": [salted_digest(salt, "PAT9")]}
    clean = {"a": {"series_uid": "9.9", "patient_id": "PAT1"}, "b": {"series_uid": "", "patient_id": ""}}
    assert check_leakage(clean, pre, allow_overlap=False) == []
    with pytest.raises(UserError, match="case s1: its series appeared in pretraining"):
        check_leakage({**clean, "s1": {"series_uid": "1.2.3", "patient_id": ""}}, pre, False)
    with pytest.raises(UserError, match="--allow-overlap"):
        check_leakage({"p": {"series_uid": "4.4", "patient_id": "PAT9"}}, pre, False)
    hits = check_leakage({"p": {"series_uid": "1.2.3", "patient_id": "PAT9"}}, pre, True)
    assert hits == ["case p: its series and its patient appeared in pretraining"]
    # empty ids never match, even if an empty id was hashed at pretraining
    pre_empty = {"salt": salt, "series_digests": [salted_digest(salt, "")],
                 "patient_digests": [salted_digest(salt, "")]}
    assert check_leakage(clean, pre_empty, False) == []
    assert check_leakage(clean, None, False) == []
    # without a series uid the case id is compared (as the exporter hashes it then)
    pre_case = {"salt": salt, "series_digests": [], "patient_digests": [],
                "case_digests": [salted_digest(salt, "b")]}
    with pytest.raises(UserError, match="case b: its case id"):
        check_leakage(clean, pre_case, False)
