"""`tcsmae info --verify` for one case: read every slice through the checked reader and
compare the content digests and the slice index with the arrays (docs/store-format.md,
"Checking a store")."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from tcsmae.errors import UserError
from tcsmae.store.format import body_fraction
from tcsmae.store.shard_reader import DamagedChunk


@dataclass
class CaseCheck:
    """Outcome of verifying one case."""

    case_id: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_array(store, key: str, n_slices: int, on_slice) -> tuple[str | None, list[str]]:
    """Read every slice of array `key` through the store's checked reader (shard_reader's
    checksums, or zarr-python's for other layouts), calling on_slice(z, slice) for each.

    Returns (sha256 of the array's C-order bytes, or None when a slice failed; problems, one
    per damaged file: the file, what is wrong and which slices)."""

    digest = hashlib.sha256()
    damaged: dict[str, tuple[str, list[int]]] = {}
    for z in range(n_slices):
        try:
            data = np.ascontiguousarray(store._read(key, z))
        except DamagedChunk as exc:
            damaged.setdefault(f"shard file {exc.path}", (exc.reason, []))[1].append(z)
            continue
        except Exception as exc:  # any other decode/IO failure is a verification failure too
            damaged.setdefault(f"{key}", (f"unreadable ({type(exc).__name__}: {exc})", []))[1].append(z)
            continue
        digest.update(data.tobytes())
        on_slice(z, data)
    problems = []
    for where, (reason, zs) in damaged.items():
        span = f"slice {zs[0]}" if len(zs) == 1 else f"slices {zs[0]}-{zs[-1]}" + (
            "" if zs[-1] - zs[0] + 1 == len(zs) else f" ({len(zs)} of them)")
        what = "image" if key.startswith("images/") else "label"
        problems.append(f"{what} {span}: {where}: {reason}")
    return (None if damaged else digest.hexdigest()), problems


def verify_case(store, case_index: int) -> CaseCheck:
    """Read every chunk of one case and check its digests and its slice-index entries."""

    cid = store.case_ids[case_index]
    check = CaseCheck(cid)
    try:
        image = store.image(cid)
        expected = dict(image.attrs).get("content_sha256")
    except UserError as exc:  # unreadable zarr.json
        check.problems.append(str(exc))
        return check
    n = int(image.shape[0])
    fractions = np.full(n, np.nan, np.float32)

    def keep_fraction(z, data):
        fractions[z] = body_fraction(data[None])[0]

    digest, problems = _read_array(store, f"images/{cid}", n, keep_fraction)
    check.problems += problems
    if expected is None:
        check.notes.append("image: no digest recorded")
    elif digest is not None and expected != digest:
        check.problems.append(f"image content digest {digest[:12]}... != recorded {expected[:12]}...")

    rows = np.flatnonzero(store.slice_case == case_index)
    zs = store.slice_z[rows]
    if len(rows) != n or not np.array_equal(np.sort(zs), np.arange(n)):
        check.problems.append(f"slice index lists {len(rows)} slices, array has {n}")
    elif digest is not None:
        bad = np.flatnonzero(np.abs(fractions[zs] - store.body_fraction[rows]) > 1e-6)
        if bad.size:
            check.problems.append(f"body fraction in the slice index disagrees with the image at "
                                  f"{bad.size} slice(s), first z={int(zs[bad[0]])}")

    try:
        label = store.label(cid)
    except UserError as exc:
        check.problems.append(str(exc))
        return check
    if label is not None:
        lexpected = dict(label.attrs).get("content_sha256")
        if tuple(label.shape) != tuple(image.shape):
            check.problems.append(f"label shape {tuple(label.shape)} != image shape {tuple(image.shape)}")
            return check
        ldigest, problems = _read_array(store, f"labels/{cid}", n, lambda z, data: None)
        check.problems += problems
        if lexpected is None:
            check.notes.append("labels: no digest recorded")
        elif ldigest is not None and lexpected != ldigest:
            check.problems.append(f"label content digest {ldigest[:12]}... != recorded {lexpected[:12]}...")
    return check
