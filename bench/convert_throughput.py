"""Benchmark (not a test): DICOM -> Zarr converter throughput in slices/s.

    .venv/bin/python bench/convert_throughput.py [--copies 4] [--phantom-cases 4]
        [--phantom-slices 32] [--phantom-dir DIR] [--workers 1 2] [--codec zstd]

Two inputs:
- the real JPEG 2000 series of ../shared/data (20 slices, 512x512), copied `--copies` times
  with fresh UIDs so that there are several series for the workers to share (the pixel
  data stays the original JPEG 2000 codestream);
- uncompressed 512x512 phantom series from `tcsmae phantom` (or an existing `--phantom-dir`).

Each input is converted into a fresh store with 1 and with 2 workers, by the real command
(`python -m tcsmae convert`, a new process, so start-up and the process pool are included).
Prints slices/s by wall time of the command and as the converter reports it (without
interpreter start-up).
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


def copy_real_series(dst: Path, copies: int) -> int:
    """Write `copies` copies of the real series with new UIDs; returns the slice count."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted((SHARED / "totalseg-dicom-series").glob("*.dcm"))
    if not files:
        sys.exit(f"real series not found under {SHARED}")
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
            ds.save_as(folder / f.name)  # pixel data: the original JPEG 2000 codestream
    return copies * len(files)


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
    p.add_argument("--copies", type=int, default=4, help="copies of the real 20-slice series (default 4)")
    p.add_argument("--phantom-cases", type=int, default=4)
    p.add_argument("--phantom-slices", type=int, default=32)
    p.add_argument("--phantom-dir", type=Path, help="existing phantom folder (its dicom/ is converted)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--codec", default="zstd", choices=("zstd", "lz4", "none"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="tcsmae-bench-") as tmp:
        tmp = Path(tmp)
        inputs = []
        n = copy_real_series(tmp / "real", args.copies)
        inputs.append((f"real JPEG 2000 512x512 ({args.copies} series x 20)", tmp / "real"))
        if args.phantom_dir:
            inputs.append((f"phantom uncompressed ({args.phantom_dir})", args.phantom_dir / "dicom"))
        else:
            t0 = time.perf_counter()
            src = make_phantom(tmp / "phantom", args.phantom_cases, args.phantom_slices)
            print(f"(phantom generated in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            inputs.append((f"phantom uncompressed 512x512 ({args.phantom_cases} series x {args.phantom_slices})", src))
        print(f"converter throughput, codec {args.codec}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"{'input':<50} {'workers':>7} {'slices':>6} {'wall s':>7} {'slices/s (wall)':>15} {'slices/s (converter)':>20}")
        for name, src in inputs:
            for w in args.workers:
                wall, reported, slices = convert(src, tmp / "out.zarr", w, args.codec)
                print(f"{name:<50} {w:>7} {slices:>6} {wall:>7.1f} {slices / wall:>15.1f} {reported:>20.1f}", flush=True)
        del n
    return 0


if __name__ == "__main__":
    sys.exit(main())
