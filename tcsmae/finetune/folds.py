"""Patient-grouped cross-validation folds and the pretraining leakage guard.

Folds are split by patient, never by slice or series, deterministically from the seed
(`make_folds`); `k = 1` is the sanity-check split (train = validate = all cases).
`check_leakage` refuses fine-tuning cases whose series or patient id digests match the
pretraining cases recorded in weights.json, unless the user allows the overlap. Rules:
docs/finetune.md, "Folds and the leakage guard".
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tcsmae.atomic_files import write_json_atomic
from tcsmae.case_digests import salted_digest
from tcsmae.errors import UserError


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: case ids to train on and to validate on."""

    train: tuple[str, ...]
    """Case ids used for training."""
    val: tuple[str, ...]
    """Case ids used for validation (all cases when k = 1)."""


def patient_groups(case_ids: list[str], patient_ids: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Group cases by patient id.

    Returns (group key -> case ids in input order, warnings). An empty or whitespace patient
    id makes the case its own group, keyed 'case:<case_id>'; patients key as 'patient:<id>'.
    """
    assert len(case_ids) == len(patient_ids)
    groups: dict[str, list[str]] = {}
    messages: list[str] = []
    for case_id, patient in zip(case_ids, patient_ids):
        patient = (patient or "").strip()
        if not patient:
            key = f"case:{case_id}"
            messages.append(f"case {case_id} has no patient id: it forms its own group; if other "
                            "cases belong to the same patient, set patient_id at conversion "
                            "(manifest column patient_id) to keep them in one fold")
        else:
            key = f"patient:{patient}"
        groups.setdefault(key, []).append(case_id)
    return groups, messages


def make_folds(case_ids: list[str], patient_ids: list[str], k: int, seed: int) -> tuple[list[Fold], list[str]]:
    """Split cases into k patient-grouped folds.

    case_ids, patient_ids: one entry per case ('' = unknown patient).
    Returns (folds, warnings); fold i validates on its cases and trains on all others.
    """
    if k < 1:
        raise UserError(f"--folds {k}: the number of folds must be at least 1")
    if len(set(case_ids)) != len(case_ids):
        raise UserError("duplicate case ids in the store; convert with unique --case-id values")
    groups, messages = patient_groups(case_ids, patient_ids)
    for m in messages:
        warnings.warn(m, stacklevel=2)
    if k == 1:
        everything = tuple(case_ids)
        return [Fold(train=everything, val=everything)], messages
    if k > len(groups):
        raise UserError(f"--folds {k}: the store has only {len(groups)} patient group(s) "
                        f"({len(case_ids)} cases); use --folds {len(groups)} or fewer, or "
                        "--folds 1 to train and validate on all cases")
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    members: list[list[str]] = [[] for _ in range(k)]
    for i in order:
        target = min(range(k), key=lambda f: (len(members[f]), f))
        members[target].extend(groups[keys[i]])
    position = {c: i for i, c in enumerate(case_ids)}
    folds = []
    for f in range(k):
        val = sorted(members[f], key=position.__getitem__)
        train = [c for c in case_ids if c not in set(val)]
        folds.append(Fold(train=tuple(train), val=tuple(val)))
    return folds, messages


def folds_document(folds: list[Fold], k: int, seed: int, messages: list[str]) -> dict:
    """The JSON content of folds.json."""
    return {"k": k, "seed": seed, "warnings": list(messages),
            "folds": [{"train": list(f.train), "val": list(f.val)} for f in folds]}


def write_folds(out_dir: str | os.PathLike, folds: list[Fold], k: int, seed: int,
                messages: list[str]) -> Path:
    """Write DIR/folds.json; an existing file with other folds is refused (a resume must match)."""
    path = Path(out_dir) / "folds.json"
    doc = folds_document(folds, k, seed, messages)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("folds") != doc["folds"]:
            raise UserError(f"{path} holds different folds (k={old.get('k')}, seed="
                            f"{old.get('seed')}) than this run (k={k}, seed={seed}) or the store's "
                            "cases changed; use the same --folds/--seed and store, or a new --out")
    write_json_atomic(path, doc)
    return path


def check_leakage(cases: dict[str, dict], pretraining: dict | None, allow_overlap: bool,
                  digest=salted_digest) -> list[str]:
    """Refuse fine-tuning cases that were pretraining cases.

    cases: case id -> store attrs (keys `series_uid`, `patient_id`; empty = unknown).
    pretraining: {"salt": str, "series_digests": [hex], "patient_digests": [hex],
        "case_digests": [hex]} (the `pretraining_cases` entry of weights.json) or None.
        A case without a series uid is matched by its case id instead (the exporter hashes
        the case id where the series or patient id is empty).
        (scratch, or weights without digests: nothing to compare).
    digest: (salt, value) -> hex, the function the exporter used.
    Returns messages about overlaps (empty when none); raises UserError on overlap unless
    `allow_overlap`.
    """
    if not pretraining:
        return []
    salt = pretraining.get("salt", "")
    series = set(pretraining.get("series_digests", []))
    patients = set(pretraining.get("patient_digests", []))
    case_digests = set(pretraining.get("case_digests", []))
    hits = []
    for case_id, attrs in cases.items():
        s = str(attrs.get("series_uid", "") or "").strip()
        p = str(attrs.get("patient_id", "") or "").strip()
        why = []
        if s and digest(salt, s) in series:
            why.append("its series")
        if not s and digest(salt, case_id) in case_digests | series:
            why.append("its case id (no series uid)")
        if p and digest(salt, p) in patients:
            why.append("its patient")
        if why:
            hits.append(f"case {case_id}: {' and '.join(why)} appeared in pretraining")
    if hits and not allow_overlap:
        shown = "; ".join(hits[:5]) + (f"; ... {len(hits) - 5} more" if len(hits) > 5 else "")
        raise UserError(f"{len(hits)} fine-tuning case(s) overlap the pretraining data ({shown}); "
                        "evaluation on them is biased. Remove them from the store, or pass "
                        "--allow-overlap if this is intended")
    return hits
