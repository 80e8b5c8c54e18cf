"""`tcsmae info STORE [--verify]`: what a store holds, and whether its bytes are intact.

One row per committed case (slices, size, dtype, spacing, labels, warnings, patient), its
warnings and the totals; --verify reads every slice through the checked reader and compares
digests and the slice index (tcsmae.store.verify), exiting 1 with the repair command of each
damaged case. Details: docs/store-format.md, "Checking a store".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from tcsmae.errors import script_main
from tcsmae.store.checks import broken_group_files
from tcsmae.store.reader import open_store
from tcsmae.store.verify import CaseCheck, verify_case

HELP = "show the cases, slices, spacing, warnings and size of a store; --verify checks every chunk"


def size_on_disk(path: Path) -> int:
    """Sum of the sizes of all files under `path`, bytes."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe(store) -> list[dict]:
    """One summary dict per committed case (from attributes and array metadata only)."""
    rows = []
    for i, cid in enumerate(store.case_ids):
        image = store.image(cid)
        attrs = dict(image.attrs)
        rows.append({
            "case_id": cid,
            "slices": int(image.shape[0]),
            "size": f"{image.shape[1]}x{image.shape[2]}",
            "dtype": str(image.dtype),
            "spacing": attrs.get("spacing_mm"),
            "labels": store.has_labels(cid),
            "warnings": list(attrs.get("warnings", [])),
            "patient_id": attrs.get("patient_id", ""),
            "codec": attrs.get("codec", "?"),
            "indexed_slices": int(np.count_nonzero(store.slice_case == i)),
        })
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("store", type=Path, help="a tcsmae store (NAME.zarr)")
    parser.add_argument("--verify", action="store_true",
                        help="read every chunk and check content digests and the slice index")


def run(args) -> int:
    from tqdm import tqdm

    store = open_store(args.store)
    rows = describe(store)
    checks: dict[str, CaseCheck] = {}
    store_problems = broken_group_files(store.path) if args.verify else []
    if args.verify:
        no_bar = True if len(store.case_ids) < 2 else None  # None: no bar in logs (not a TTY), as `tcsmae convert`
        for i, cid in enumerate(tqdm(store.case_ids, desc="verify", unit="case", disable=no_bar)):
            checks[cid] = verify_case(store, i)

    width = max([len("case")] + [len(r["case_id"]) for r in rows])
    header = (f"{'case':<{width}}  {'slices':>6}  {'size':>9}  {'dtype':<7}  {'spacing z,y,x mm':<20}  "
              f"{'labels':<6}  {'warn':>4}  {'codec':<5}  patient")
    if args.verify:
        header += "  verify"
    print(header)
    for r in rows:
        sp = r["spacing"]
        spacing = ",".join(f"{v:.3g}" for v in sp) if sp else "?"
        line = (f"{r['case_id']:<{width}}  {r['slices']:>6}  {r['size']:>9}  {r['dtype']:<7}  {spacing:<20}  "
                f"{'yes' if r['labels'] else 'no':<6}  {len(r['warnings']):>4}  {r['codec']:<5}  {r['patient_id'] or '-'}")
        if args.verify:
            c = checks[r["case_id"]]
            line += "  " + ("OK" if c.ok else "FAILED") + (f" ({'; '.join(c.notes)})" if c.notes else "")
        print(line)

    warned = [r for r in rows if r["warnings"]]
    if warned:
        print("\nwarnings:")
        for r in warned:
            for w in r["warnings"]:
                print(f"  {r['case_id']}: {w}")

    n_slices = store.n_slices
    print(f"\n{len(rows)} cases, {n_slices} slices, "
          f"{sum(r['labels'] for r in rows)} with labels, "
          f"{int(np.count_nonzero(store.body_fraction < 0.05))} slices with < 5% body; "
          f"{_human(size_on_disk(store.path))} on disk ({store.path})")

    if not args.verify:
        return 0
    failed = [c for c in checks.values() if not c.ok]
    if failed or store_problems:
        print("\nverification FAILED:")
        for p in store_problems:
            print(f"  store: {p}")
        for c in failed:
            for p in c.problems:
                print(f"  {c.case_id}: {p}")
    if failed:
        print("\nto repair, convert each damaged case again from its source with --overwrite "
              "(without it a re-run never rebuilds a case whose source is unchanged):")
        for c in failed:
            print(f"  {c.case_id}: {store.repair_command(c.case_id)}")
    if failed or store_problems:
        return 1
    print(f"verified: every chunk of {len(checks)} cases read, digests and slice index match")
    return 0


if __name__ == "__main__":
    sys.exit(script_main("tcsmae.store.info", "info.py"))
