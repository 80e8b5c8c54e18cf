"""Benchmark (not a test): DICOM -> Zarr converter throughput in slices/s.

    .venv/bin/python bench/convert_throughput.py [--copies 4] [--phantom-cases 2]
        [--phantom-slices 40] [--phantom-dir DIR] [--workers 1 2] [--repeat 2] [--codec zstd]

Inputs: the real JPEG 2000 series of ../shared/data (20 slices, 512x512) and uncompressed
512x512 phantom series (`tcsmae phantom`, or `--phantom-dir`), each copied `--copies` times
with fresh UIDs so that the workers have several series to share. Each is converted into a
fresh store by the real command (`python -m tcsmae convert`, a new process: start-up and the
process pool included); prints slices/s by wall time and as the converter reports it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()


def copy_series(files: list[Path], dst: Path, copies: int) -> None:
    """Write `copies` copies of one series with fresh UIDs (pixel data bytes unchanged)."""
    import pydicom
    from pydicom.uid import generate_uid

    for c in range(copies):
        series_uid, for_uid = generate_uid(), generate_uid()
        folder = dst / f"copy{c}"
        folder.mkdir(parents=True)
        for f in files:
            ds = pydicom.dcmread(f)
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = for_uid
            ds.save_as(folder / f.name)


def make_phantom(dst: Path, cases: int, slices: int) -> Path:
    cmd = [sys.executable, "-m", "tcsmae", "phantom", "-o", str(dst), "--cases", str(cases),
           "--size", "512", "--slices", str(slices)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dst / "dicom"


def convert(source: Path, out: Path, workers: int, codec: str) -> tuple[float, float, int]:
    """(wall seconds, converter-reported slices/s, slices) of one fresh conversion."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tcsmae", "convert", str(source), "-o", str(out),
           "--workers", str(workers), "--codec", codec]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"conversion failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"converted \((\d+) slices, ([\d.]+) slices/s\)", proc.stdout)
    if not m:
        sys.exit(f"unexpected converter output:\n{proc.stdout}")
    return wall, float(m.group(2)), int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=4, help="copies of each source series, with fresh UIDs (default 4)")
    p.add_argument("--phantom-cases", type=int, default=2, help="phantom series to generate (default 2)")
    p.add_argument("--phantom-slices", type=int, default=40)
    p.add_argument("--phantom-dir", type=Path, help="existing `tcsmae phantom` folder to use instead of generating one")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest is shown (shared machines)")
    p.add_argument("--codec", default="zstd", choices=("zstd", "lz4", "none"))
    args = p.parse_args()

    real_files = sorted((SHARED / "totalseg-dicom-series").glob("*.dcm"))
    if not real_files:
        sys.exit(f"real series not found under {SHARED}")
    with tempfile.TemporaryDirectory(prefix="tcsmae-bench-") as tmp:
        tmp = Path(tmp)
        copy_series(real_files, tmp / "real", args.copies)
        phantom = args.phantom_dir
        if phantom is None:
            t0 = time.perf_counter()
            phantom = make_phantom(tmp / "phantom", args.phantom_cases, args.phantom_slices).parent
            print(f"(phantom generated in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        phantom_series = sorted(d for d in (phantom / "dicom").iterdir() if d.is_dir())
        n_phantom = 0
        for i, d in enumerate(phantom_series):
            files = sorted(d.glob("*.dcm"))
            n_phantom += len(files) * args.copies
            copy_series(files, tmp / "phantom_copies" / f"s{i}", args.copies)
        inputs = [
            (f"real JPEG 2000 512x512, {args.copies} x 20 slices", tmp / "real"),
            (f"phantom uncompressed 512x512, {len(phantom_series) * args.copies} series", tmp / "phantom_copies"),
        ]
        print(f"converter throughput, codec {args.codec}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"{'input':<48} {'workers':>7} {'slices':>6} {'wall s':>7} {'slices/s (wall)':>15} {'slices/s (converter)':>20}")
        for name, src in inputs:
            for w in args.workers:
                runs = [convert(src, tmp / "out.zarr", w, args.codec) for _ in range(args.repeat)]
                wall, reported, slices = min(runs)
                print(f"{name:<48} {w:>7} {slices:>6} {wall:>7.1f} {slices / wall:>15.1f} {reported:>20.1f}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
