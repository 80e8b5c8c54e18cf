"""`tcsmae convert` / `python convert/dicom_to_zarr.py`: DICOM CT series -> tcsmae Zarr store.

Scans SRC (files or folders, recursively), plans one case per CT series, converts the series
in worker processes (each writes its case's arrays) and commits them to the slice index one
at a time in this process, so a crash never leaves half a case visible. Re-runs,
--overwrite and exit codes: docs/store-format.md, "Converters".
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tcsmae.convert.dicom_scan import SKIPPED_BY_DESIGN, SeriesError, discover_files, plan_series, scan_file
from tcsmae.convert.dicom_volume import case_attrs, read_series
from tcsmae.convert.label_alignment import align_labels
from tcsmae.convert.manifest import NIFTI_SUFFIXES, read_manifest
from tcsmae.errors import UserError, script_main
from tcsmae.store.format import check_case_id
from tcsmae.store.repair import conversion_arguments, image_attrs, inputs_digest
from tcsmae.store.writer import StoreWriter, write_case_arrays

HELP = "convert DICOM CT series (folders/files, recursive) into a tcsmae Zarr store of HU volumes"

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
SCAN_IN_POOL_FROM = 400
"""Scan headers in the worker pool only from this many files on (else in this process)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SRC", help="DICOM files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.zarr", help="store to create or add to")
    parser.add_argument("--labels", metavar="SEG.nii.gz", help="NIfTI label map for the (single) series in SRC, on its grid")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="fail series with gaps, uneven spacing or gantry tilt instead of warning")
    parser.add_argument("--overwrite", action="store_true", help="rebuild cases already in the store, each replaced only once its rebuild succeeded "
                        "(default: skip unchanged, refuse changed or damaged ones)")
    parser.add_argument("--case-id", metavar="ID", help="case id for the single series in SRC (default: SeriesInstanceUID or a digest)")
    parser.add_argument("--patient-id", metavar="ID", help="patient id for every series in SRC (default: PatientID; "
                        "folds split by patient, so set it for anonymised data)")
    parser.add_argument("--manifest", metavar="FILE.csv", help="CSV with columns source,labels,case_id,patient_id (one row per DICOM folder; "
                        "NIfTI rows go to `tcsmae convert-nifti --manifest`)")
    parser.add_argument("--codec", choices=("zstd", "lz4", "none"), default="zstd", help="chunk compression (default: %(default)s)")


@dataclass
class Job:
    """A group of sources converted together, with per-group overrides."""

    sources: list[Path]
    labels: Path | None = None
    case_id: str | None = None
    patient_id: str | None = None
    origin: str = "command line"


@dataclass
class Outcome:
    """Result of one series (or one refused file)."""

    what: str  # case id or series description
    status: str  # converted | up to date | skipped (refused: too few slices, missing tags) | failed
    slices: int = 0
    reason: str = ""
    path: str | None = None
    warnings: list[str] = field(default_factory=list)
    body_fraction: object = None
    source_sha256: str = ""


def run(args: argparse.Namespace) -> int:
    from concurrent.futures.process import BrokenProcessPool

    started = time.perf_counter()
    jobs = _jobs_from_args(args)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: give 1 or more")
    if args.case_id is not None:
        check_case_id(args.case_id)

    files_of_job: list[list[Path]] = []
    for job in jobs:
        try:
            files_of_job.append(discover_files(job.sources))
        except FileNotFoundError as exc:
            raise UserError(f"source {exc} does not exist ({job.origin}); give existing DICOM files or folders") from None
    all_files = sorted({f for fs in files_of_job for f in fs})
    if not all_files:
        raise UserError(f"no files found in {', '.join(str(s) for j in jobs for s in j.sources)}", exit_code=EXIT_NOTHING)

    try:
        outcomes, skipped_files = _scan_plan_convert(args, jobs, files_of_job, all_files)
    except OSError as exc:  # the output cannot be written (a file in the way, disk full, ...)
        raise UserError(
            f"cannot write the store {args.output}: {exc}; cases committed before this are kept",
            exit_code=EXIT_NOTHING,
        ) from None
    except BrokenProcessPool as exc:
        raise UserError(
            f"a worker process died ({exc}); cases committed so far are kept. The usual cause is "
            "memory: run again with fewer --workers (finished cases are skipped)",
            exit_code=EXIT_NOTHING,
        ) from None
    _print_summary(outcomes, skipped_files, args.output, time.perf_counter() - started)
    return _exit_code(outcomes)


def _scan_plan_convert(args, jobs: list[Job], files_of_job: list[list[Path]], all_files: list[Path]):
    with _pool(args.workers) as pool:
        scans = _scan(all_files, pool)
        scan_of = {s.path: s for s in scans}
        plans, outcomes = _plan(jobs, files_of_job, scan_of)
        skipped_files = [s for s in scans if s.kind in SKIPPED_BY_DESIGN]
        with StoreWriter(args.output, codec=args.codec, discard_if_empty=True) as writer:
            if writer.cleaned:
                print(f"removed leftovers of unfinished cases: {', '.join(writer.cleaned)}", file=sys.stderr)
            todo = []  # (plan, whether it replaces a committed case)
            for plan in plans:
                existing = writer.source_sha256(plan.case_id)
                if existing is None or args.overwrite:
                    todo.append((plan, existing is not None))
                elif existing != plan.source_sha256:
                    stored = image_attrs(writer.path, plan.case_id)  # None: its zarr.json is damaged
                    reason = ((stored is None and writer.damage_report(plan.case_id))
                              or _why_changed(stored or {}, existing, plan))
                    outcomes.append(Outcome(plan.case_id, "failed", 0, reason, plan.first_file))
                elif damage := writer.damage_report(plan.case_id):
                    outcomes.append(Outcome(plan.case_id, "failed", 0, damage, plan.first_file))
                else:
                    outcomes.append(Outcome(plan.case_id, "up to date", len(plan.slices), "source digest unchanged", plan.first_file))
            outcomes.extend(_convert(todo, writer, pool, args))
    return outcomes, skipped_files


def _jobs_from_args(args) -> list[Job]:
    jobs: list[Job] = []
    if args.patient_id is not None and args.manifest:
        raise UserError("--patient-id applies to the series in SRC, not to manifest rows: give each row its patient "
                        "in the manifest's patient_id column (and convert SRC in a run of its own)")
    if args.patient_id is not None and not args.patient_id.strip():
        raise UserError("--patient-id is blank; give the patient's id (a blank one means 'no patient id')")
    if args.sources:
        labels = Path(args.labels) if args.labels else None
        jobs.append(Job([Path(s) for s in args.sources], labels, args.case_id, args.patient_id))
        _refuse_nifti(jobs[0], "convert it with `tcsmae convert-nifti FILE.nii.gz -o OUT.zarr`")
    elif args.labels or args.case_id or args.patient_id is not None:
        raise UserError("--labels, --case-id and --patient-id apply to the series in SRC; give SRC "
                        "(or use the manifest's columns)")
    if args.manifest:
        for row in read_manifest(args.manifest):
            if row.case_id is not None:
                check_case_id(row.case_id)
            jobs.append(Job([row.source], row.labels, row.case_id, row.patient_id, f"{args.manifest} line {row.line}"))
            _refuse_nifti(jobs[-1], "list NIfTI rows in a manifest of their own for "
                                    "`tcsmae convert-nifti --manifest FILE.csv -o OUT.zarr`")
    if not jobs:
        raise UserError("nothing to convert: give SRC folders/files or --manifest FILE.csv")
    if args.labels and not Path(args.labels).is_file():
        raise UserError(f"--labels {args.labels} does not exist; give a NIfTI label map (.nii or .nii.gz)")
    return jobs


def _refuse_nifti(job: Job, fix: str) -> None:
    """UserError when the job names a NIfTI file: this converter reads DICOM only (without this
    check a NIfTI source is skipped as 'not DICOM', or, with labels, reported as 'no series')."""

    for source in job.sources:
        if source.name.endswith(NIFTI_SUFFIXES) and not source.is_dir():
            raise UserError(f"{source} ({job.origin}) is a NIfTI file, and `tcsmae convert` reads DICOM: {fix} "
                            "(one store may hold both)")


class _InlinePool:
    """Stand-in for a process pool with one worker: runs tasks here (no process start-up)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def _pool(workers: int):
    """A process pool whose workers hold the converter modules before the first task.

    On Linux, when this process runs no threads but fork-safe ones (see `_fork_safe`), the
    workers are forked right away (cheap: modules already imported). Otherwise they come
    from a forkserver (or spawn) with the converter modules preloaded.
    """
    if workers == 1:
        return _InlinePool()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and _fork_safe():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
        pool.submit(os.getpid).result()  # with fork, all workers start at the first task
        return pool
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([
            "numpy", "pydicom", "pydicom.pixels", "zarr", "tcsmae.convert.dicom_scan", "tcsmae.convert.dicom_volume", "tcsmae.store.writer"
        ])
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


FORK_SAFE_THREADS = ("zarr_io", "asyncio_", "tqdm_monitor")
"""Name prefixes of threads that do not stop a fork: zarr's event loop and its executor
threads (zarr resets its loop in a forked child, os.register_at_fork), tqdm's monitor."""


def _fork_safe() -> bool:
    """Whether this process may fork workers: no threads but the main one and known ones
    (a calling program may run torch/DALI/TensorBoard threads, which forking could copy
    mid-operation)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    return all(t.name.startswith(FORK_SAFE_THREADS) for t in others)


def _scan(files: list[Path], pool) -> list:
    from tqdm import tqdm

    if len(files) >= SCAN_IN_POOL_FROM:
        results = pool.map(scan_file, files, chunksize=max(1, min(64, len(files) // 32)))
    else:  # header scans take ~3 ms a file: for a few hundred files, shipping them costs more
        results = map(scan_file, files)
    return list(tqdm(results, total=len(files), desc="scanning", unit="file", disable=None, leave=False))


def _plan(jobs: list[Job], files_of_job: list[list[Path]], scan_of: dict) -> tuple[list, list[Outcome]]:
    plans, outcomes = [], []
    seen: dict[str, str] = {}
    for job, files in zip(jobs, files_of_job):
        job_plans, refusals = plan_series([scan_of[str(f)] for f in files])
        for r in refusals:
            outcomes.append(Outcome(r.what, "failed" if r.failed else "skipped", 0, r.reason, r.path))
        if (job.labels or job.case_id) and len(job_plans) != 1:
            found = ", ".join(p.description for p in job_plans) or "none"
            flag = "--labels" if job.labels else "--case-id"
            raise UserError(
                f"{flag} ({job.origin}) needs exactly one image series in {', '.join(map(str, job.sources))}, "
                f"found {len(job_plans)}: {found}; give the folder of one series"
            )
        for plan in job_plans:
            plan.conversion = conversion_arguments("convert", job.sources, job.labels, job.case_id, job.patient_id)
            if job.case_id:
                plan.case_id = job.case_id
            plan.labels = str(job.labels) if job.labels else None
            plan.patient_id = job.patient_id
            plan.source_sha256 = inputs_digest(plan.source_sha256, job.labels, job.patient_id)
            if plan.case_id in seen:
                outcomes.append(Outcome(plan.case_id, "failed", 0, f"case id already used by {seen[plan.case_id]}", plan.first_file))
                continue
            seen[plan.case_id] = plan.description
            plans.append(plan)
    return plans, outcomes


def _why_changed(stored: dict, stored_digest: str, plan) -> str:
    """Why a case already in the store differs from this run's plan, and the fix.

    stored: the case's image attributes; stored_digest: its source digest in the index.
    """
    stored_dicom = stored.get("dicom_sha256")
    if stored_dicom is None and stored_digest == plan.dicom_sha256:
        stored_dicom = plan.dicom_sha256  # written before dicom_sha256 existed, from DICOM files alone
    if stored_dicom is None:
        return ("already in the store from other inputs (DICOM files, label map or patient id); pass --overwrite "
                "to rebuild it from this run's, or --case-id to keep both")
    if stored_dicom != plan.dicom_sha256:
        return ("already in the store from different DICOM files; pass --overwrite to replace it, or --case-id "
                "to keep both")
    old_labels, new_labels = stored.get("labels_source"), plan.labels
    changes = []
    if new_labels and not old_labels:
        changes.append(f"a label map was added ({new_labels})")
    elif old_labels and not new_labels:
        changes.append(f"its label map ({old_labels}) is not given in this run")
    elif old_labels != new_labels:
        changes.append(f"its label map changed from {old_labels} to {new_labels}")
    old_patient = stored.get("patient_id")
    new_patient = plan.patient_id if plan.patient_id is not None else plan.slices[0].patient_id
    if new_patient != old_patient:
        changes.append(f"its patient id changed from {old_patient!r} to {new_patient!r}")
    if not changes:
        changes.append(f"the label map {new_labels} changed since, or a patient id override was added or dropped"
                       if new_labels else "a patient id override was added or dropped")
    return (f"already in the store from the same DICOM files, but {' and '.join(changes)}; pass --overwrite "
            "to rebuild it with this run's label map and patient id")


def _convert(todo: list, writer, pool, args) -> list[Outcome]:
    """Convert each (plan, replaces) of `todo` in the pool and commit it. A case that replaces a
    committed one (--overwrite) is written beside it (tcsmae.store.format.staging_name) and swapped in only
    once converted: a failed rebuild leaves the old case in place."""
    from tqdm import tqdm

    outcomes = []
    total = sum(len(plan.slices) for plan, _ in todo)
    tasks = [(plan, str(args.output), args.codec, args.strict, replaces) for plan, replaces in todo]
    results = pool.map(convert_series, tasks, chunksize=1) if len(tasks) > 1 else map(convert_series, tasks)
    with tqdm(total=total, desc="converting", unit="slice", disable=None) as bar:
        for (plan, replaces), outcome in zip(todo, results):
            if outcome.status == "converted" and replaces:
                writer.commit_staged(outcome.what, outcome.body_fraction, outcome.source_sha256)
            elif outcome.status == "converted":
                writer.commit_case(outcome.what, outcome.body_fraction, outcome.source_sha256)
            elif replaces:
                writer.discard_staged(plan.case_id)  # the old case stays
            else:
                writer.remove_case(plan.case_id)  # arrays of a failed case (never committed)
            bar.update(len(plan.slices))
            outcomes.append(outcome)
    return outcomes


def convert_series(task: tuple) -> Outcome:
    """Worker: decode one series, align its labels, write its arrays (not committed).

    task: (SeriesPlan, store path, codec, strict, staged: write beside the committed case of
    that id, see tcsmae.store.format.staging_name). Never raises for bad input: every problem comes back as
    a failed Outcome naming the file.
    """

    plan, store_path, codec, strict, staged = task
    try:
        volume = read_series(plan, strict=strict)
        attrs = case_attrs(plan, volume)
        if "conversion" in attrs:
            attrs["conversion"]["codec"] = codec
        labels = None
        if plan.labels:
            g = volume.geometry
            labels = align_labels(plan.labels, g.voxel_to_lps(), g.slice_positions_mm(), volume.hu.shape)
            attrs["labels_source"] = plan.labels
        bf = write_case_arrays(store_path, plan.case_id, volume.hu, attrs, labels, codec=codec, staged=staged,
                               source=f"the series of {plan.first_file}")
    except SeriesError as exc:
        return Outcome(plan.case_id, "failed", 0, str(exc), exc.path or plan.first_file)
    except UserError as exc:
        return Outcome(plan.case_id, "failed", 0, str(exc), plan.labels or plan.first_file)
    except MemoryError:
        return Outcome(plan.case_id, "failed", 0, "out of memory; use fewer --workers", plan.first_file)
    except Exception as exc:  # a bug or an exotic file: report it with the series, keep going
        return Outcome(plan.case_id, "failed", 0, f"unexpected {type(exc).__name__}: {exc}", plan.first_file)
    return Outcome(
        plan.case_id, "converted", volume.hu.shape[0], "", plan.first_file, attrs["warnings"], bf,
        plan.source_sha256,
    )


def _print_summary(outcomes: list[Outcome], skipped_files: list, output, seconds: float) -> None:
    from collections import Counter

    rows = [(o.status, o.what, str(o.slices) if o.slices else "", _detail(o)) for o in outcomes]
    order = {"converted": 0, "up to date": 1, "skipped": 2, "failed": 3}
    rows.sort(key=lambda r: (order.get(r[0], 9), r[1]))
    if rows:
        width = min(max(len(r[1]) for r in rows), 70)
        print(f"{'status':<11} {'case / series':<{width}} {'slices':>6}  detail")
        for status, what, n, detail in rows:
            print(f"{status:<11} {what[:width]:<{width}} {n:>6}  {detail}")
    by_reason = Counter(s.reason for s in skipped_files)
    for reason, count in sorted(by_reason.items()):
        example = next(s.path for s in skipped_files if s.reason == reason)
        print(f"skipped by design: {count} file(s): {reason} (e.g. {example})")
    converted = [o for o in outcomes if o.status == "converted"]
    n_slices = sum(o.slices for o in converted)
    rate = n_slices / seconds if seconds > 0 else 0.0
    counts = Counter(o.status for o in outcomes)
    print(
        f"{output}: {counts['converted']} converted ({n_slices} slices, {rate:.1f} slices/s), "
        f"{counts['up to date']} up to date, {counts['skipped']} skipped, {counts['failed']} failed, "
        f"{len(skipped_files)} file(s) skipped by design; {seconds:.1f} s"
        + ("" if Path(output).exists() else f"; {output} not created: nothing converted")
    )


def _detail(o: Outcome) -> str:
    if o.status == "converted":
        return "; ".join(o.warnings) if o.warnings else "ok"
    where = f" [file: {o.path}]" if o.path and o.path not in o.reason else ""
    return o.reason + where


def _exit_code(outcomes: list[Outcome]) -> int:
    good = sum(o.status in ("converted", "up to date") for o in outcomes)
    bad = sum(o.status in ("failed", "skipped") for o in outcomes)  # files skipped by design are no outcomes
    if good == 0:
        return EXIT_NOTHING
    return EXIT_PARTIAL if bad else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Script entry: parse, run, print a UserError without a traceback."""

    return script_main("tcsmae.convert.dicom_to_zarr", "dicom_to_zarr.py", argv)


if __name__ == "__main__":
    sys.exit(main())
