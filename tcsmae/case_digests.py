"""The leakage guard's digests: salted SHA-256 of a store's series, patient and case ids.

Pretraining records them (checkpoints, then weights.json) and fine-tuning compares its own
cases against them (tcsmae.finetune.folds.check_leakage) to refuse cases seen in pretraining.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tcsmae.store.reader import open_store


def pretraining_case_digests(store_path: Path) -> dict:
    """Salted SHA-256 digests of the store's series and patient ids (case id when empty)."""
    import secrets

    store = open_store(store_path)
    salt = secrets.token_hex(16)
    series, patients, cases = set(), set(), set()
    for case_id in store.case_ids:
        attrs = store.case_attrs(case_id)
        series.add(salted_digest(salt, str(attrs.get("series_uid") or "").strip() or case_id))
        patients.add(salted_digest(salt, str(attrs.get("patient_id") or "").strip() or case_id))
        cases.add(salted_digest(salt, case_id))
    return {"salt": salt, "series_digests": sorted(series), "patient_digests": sorted(patients),
            "case_digests": sorted(cases), "n_cases": len(store.case_ids)}


# ---------------------------------------------------------------------------------------
# Leakage guard


def salted_digest(salt: str, value: str) -> str:
    """SHA-256 hex of salt + value (UTF-8), the form weights.json stores ids in."""
    return hashlib.sha256((salt + value).encode("utf-8")).hexdigest()
