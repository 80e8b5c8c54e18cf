"""Driver of the GPU visit (bench/gpu_visit.sh): the transfer plan, each measured step of
the last call, and the record of every step in OUT/visit.json (rewritten atomically).

    python3 bench/gpu_visit.py plan [--dry]          # the calls to make (sizes from .devcarry/)
    python3 bench/gpu_visit.py step NAME --json OUT/visit.json --work DIR [--device cpu|cuda]
    python3 bench/gpu_visit.py record|summary ...    # gpu_visit.sh calls these

Only the standard library is imported at module top: `plan` runs before anything is
downloaded, and `record` must work on the GPU machine when the install itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# ------------------------------------------------------------------ the transfer plan
CALL_LIMIT_BYTES = 64 * MIB
"""What one call may move: the working tree plus its carried paths."""
MAX_CARRY = 8
MAX_CALLS = 4
MAX_COMMAND_CHARS = 2000
PART_MIB = 60
"""Size of the DALI wheel's parts: 3 x 60 MiB + the rest, so that 4 calls move everything."""

CARRY_DIR = ".devcarry"
MANIFEST = f"{CARRY_DIR}/visit.sha256"
"""sha256 of every DALI part (dali/part-NN) and real sample (shared-data/...), relative to
.devcarry/: every call checks against it what arrived before it."""
REST = (f"{CARRY_DIR}/dali/SHA256", f"{CARRY_DIR}/wheels", f"{CARRY_DIR}/device-install.sh",
        f"{CARRY_DIR}/shared-data")
"""Carried by the last call, besides its DALI part and the manifest."""

DRY_DALI_BYTES = 198_655_209
"""nvidia-dali-cuda130 2.4.0's wheel, for `plan --dry` when no wheel was downloaded."""
DRY_WHEELS_BYTES = 16 * MIB

# Step limits of the last call (seconds); they sum to 480, inside the call's timeout.
STEP_LIMITS = {"install": 90, "smoke": 50, "gpu_tests": 130, "dali_gpu": 40, "kernels": 30,
               "loader": 65, "end_to_end": 75}
STAGES = tuple(STEP_LIMITS)
VISIT_TIMEOUT_S = 540
RECEIVE_TIMEOUT_S = 60


class PlanError(ValueError):
    """The files do not fit the calls' limits."""


@dataclasses.dataclass
class Call:
    carry: list[str]
    command: str
    carried_bytes: int
    tree_bytes: int
    timeout_s: int

    @property
    def total_bytes(self) -> int:
        return self.carried_bytes + self.tree_bytes


def plan_calls(parts: list[tuple[str, int]], rest: list[tuple[str, int]], tree_bytes: int,
               manifest_bytes: int = 4096) -> list[Call]:
    """The calls that move `parts` (the DALI wheel's parts, in order: (path, bytes)) and
    `rest` (wheels, installer, real data: (path, bytes)) with the working tree
    (`tree_bytes`, sent with every call). One part per call; the last call also takes
    `rest`, joins, installs and runs the measured steps. Every call carries the manifest.
    Raises PlanError when a call would break a limit (bytes, carried paths, calls, command)."""
    if not parts:
        raise PlanError("no DALI parts: run `bash bench/gpu_visit.sh plan` (it downloads them)")
    calls = []
    for i, (path, size) in enumerate(parts):
        last = i == len(parts) - 1
        carry = [path, MANIFEST] + ([p for p, _ in rest] if last else [])
        carried = size + manifest_bytes + (sum(s for _, s in rest) if last else 0)
        command = ("bash bench/gpu_visit.sh visit" if last
                   else f"bash bench/gpu_visit.sh receive {Path(path).name}")
        calls.append(Call(carry, command, carried, tree_bytes,
                          VISIT_TIMEOUT_S if last else RECEIVE_TIMEOUT_S))
    problems = []
    if len(calls) > MAX_CALLS:
        problems.append(f"{len(calls)} calls (at most {MAX_CALLS}): raise PART_MIB")
    for n, call in enumerate(calls, 1):
        if call.total_bytes > CALL_LIMIT_BYTES:
            problems.append(f"call {n} moves {call.total_bytes / MIB:.1f} MiB (at most "
                            f"{CALL_LIMIT_BYTES // MIB}): lower PART_MIB or shrink the tree")
        if len(call.carry) > MAX_CARRY:
            problems.append(f"call {n} carries {len(call.carry)} paths (at most {MAX_CARRY})")
        if len(call.command) > MAX_COMMAND_CHARS:
            problems.append(f"call {n}'s command has {len(call.command)} characters")
    if problems:
        raise PlanError("; ".join(problems))
    return calls


def format_plan(calls: list[Call]) -> str:
    n = len(calls)
    lines = [f"GPU visit: {n} calls to `run`, back to back: a machine idle for 30 s is given back,",
             "so make each call as soon as the one before returns, and never give_back in between.",
             "Each call's first output line says whether the parts sent before are still there;",
             "a line starting MISSING means the machine was released: start again at call 1.", ""]
    for i, call in enumerate(calls, 1):
        lines += [(f"call {i} of {n}: {call.total_bytes / MIB:.1f} MiB (tree {call.tree_bytes / MIB:.1f}"
                   f" + carried {call.carried_bytes / MIB:.1f}; limit {CALL_LIMIT_BYTES // MIB}), "
                   f"{len(call.carry)} carried paths (limit {MAX_CARRY})"),
                  f"  carry:     {json.dumps(call.carry)}",
                  f"  command:   {call.command}",
                  f"  timeout_s: {call.timeout_s}"]
    steps = ", ".join(f"{k} {v}" for k, v in STEP_LIMITS.items())
    lines += ["", f"Call {n} runs each step under its own limit (s): {steps}",
              (f"(total {sum(STEP_LIMITS.values())} s). Logs and visit.json come back from $OUT; "
               "the output ends with one line per step."),
              (f"Rerun: within 30 s of call {n}, make call {n} again (install is skipped when "
               "/tmp/site is there);"),
              f"once the machine is gone, calls 1 to {n} again. Then give_back."]
    return "\n".join(lines)


_NOT_SENT = {"__pycache__", "build", "runs", "demo-run"}


def _tree_bytes(root: Path) -> int:
    """Bytes of the working tree that travels with every call: tracked files and untracked
    files that git does not ignore (without git: every file outside hidden, cache and build
    folders, an estimate)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True).stdout
        names = [os.fsdecode(n) for n in out.split(b"\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(root)) for p in root.rglob("*")
                 if not any(part.startswith(".") or part in _NOT_SENT or part.endswith((".egg-info", ".zarr"))
                            for part in p.relative_to(root).parts)]
    paths = (root / n for n in names)
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def current_plan(root: Path, dry: bool, part_mib: int = PART_MIB) -> list[Call]:
    """The plan from the files in root/.devcarry; dry: without them, from the nominal sizes
    (DALI wheel, wheels) and ../shared/data."""
    carry = root / CARRY_DIR
    parts = sorted((carry / "dali").glob("part-*"))
    if parts and not dry:
        part_list = [(f"{CARRY_DIR}/dali/{p.name}", p.stat().st_size) for p in parts]
        rest = [(p, _size(root / p)) for p in REST]
    else:
        if not dry:
            raise PlanError(f"no parts in {carry}/dali: run `bash bench/gpu_visit.sh plan`")
        step, total = part_mib * MIB, DRY_DALI_BYTES
        part_list = [(f"{CARRY_DIR}/dali/part-{i:02d}", min(step, total - i * step))
                     for i in range((total + step - 1) // step)]
        data = root.parent / "shared" / "data"
        rest = [(REST[0], 200), (REST[1], DRY_WHEELS_BYTES), (REST[2], 4096),
                (REST[3], _size(data) if data.is_dir() else 4 * MIB)]
    return plan_calls(part_list, rest, _tree_bytes(root))


# ------------------------------------------------------------------ visit.json
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_stage(path: Path, stage: str, **fields) -> dict:
    """Merge `fields` into visit.json's stages[stage] and rewrite the file atomically."""
    data = _read_json(path)
    data.setdefault("stages", {}).setdefault(stage, {}).update(fields)
    _write_json(path, data)
    return data


def init_visit(path: Path, mode: str, device: str, sizes: str, preamble: str = "") -> None:
    """Start visit.json: the settings, and the call's first lines (the parts and samples
    checks: the device tool returns only the end of the output)."""
    _write_json(path, {"schema": "tcsmae-gpu-visit/1", "mode": mode, "device": device,
                       "sizes": sizes, "settings": dataclasses.asdict(SIZES[sizes]),
                       "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "preamble": preamble.splitlines(), "step_limits_s": STEP_LIMITS,
                       "stages": {}, "complete": False})


def record(path: Path, stage: str, rc: int, started: float, limit: int, log: str,
           skipped: str | None = None) -> None:
    """The shell's word on a step: status ok | failed | timeout | skipped, seconds, rc."""
    if skipped is not None:
        update_stage(path, stage, status="skipped", why=skipped, seconds=0.0, limit_s=limit)
        return
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    update_stage(path, stage, status=status, rc=rc, seconds=round(time.time() - started, 1),
                 limit_s=limit, log=log)


def _headline(name: str, result: dict | None) -> str:
    r = result or {}
    if "error" in r:
        return r["error"].splitlines()[0][:90]
    try:
        if name == "smoke":
            h2d = r.get("h2d", {}).get("pinned_gb_per_s")
            return (f"{r['machine'].get('gpu') or 'no GPU'}; pipeline batch {r['pipeline']['shape']}"
                    + (f"; pinned H2D {h2d:.1f} GB/s" if h2d else ""))
        if name == "gpu_tests":
            if "collected" in r:
                return f"{r['collected']} GPU tests collected (not run: no CUDA); data present"
            return (f"{r['tests']} tests: {r['passed']} passed, {r['failures']} failed, "
                    f"{r['errors']} errors, {r['skipped']} skipped")
        if name == "dali_gpu":
            return "; ".join(f"batch {b}: {v['slices_per_s']:.0f} slices/s ({v['path']})"
                             for b, v in r["batches"].items())
        if name == "kernels":
            return "; ".join(f"batch {b}: chain {v['chain_ms']:.2f} ms = "
                             f"{v['chain_slices_per_s']:.0f} slices/s"
                             + (f", {v['kernel_share_of_dali']:.0%} of DALI's time"
                                if v.get("kernel_share_of_dali") else "")
                             for b, v in r["batches"].items())
        if name == "loader":
            return (f"{r['slices_per_s']:.0f} slices/s (source only "
                    f"{r['source_only_slices_per_s']:.0f}), batch {r['batch_size']}, {r['store_kind']}")
        if name == "end_to_end":
            return (f"{r['pairs_per_s']:.1f} pairs/s, data_stall {r['data_stall']:.2f}, "
                    f"batch {r['batch_size']}, {r['encoder']}")
    except (KeyError, TypeError, AttributeError):
        pass
    return ""


def summary(path: Path) -> int:
    """Print one line per stage (status, seconds, headline figure); mark the file complete.
    Returns 0 when every stage that was not skipped is ok."""
    data = _read_json(path)
    stages = data.get("stages", {})
    bad = []
    print(f"\n{'stage':<11} {'status':<8} {'s':>6}  figures   ({data.get('mode')} on {data.get('device')})")
    for name in STAGES:
        st = stages.get(name, {})
        status = st.get("status", "missing")
        if status not in ("ok", "skipped"):
            bad.append(name)
        text = st.get("why", "") if status == "skipped" else _headline(name, st.get("result"))
        print(f"{name:<11} {status:<8} {st.get('seconds', 0):>6.1f}  {text}")
    total = sum(stages.get(n, {}).get("seconds", 0) for n in STAGES)
    ok = not bad
    print(f"visit {'ok' if ok else 'FAILED: ' + ', '.join(bad)}; {total:.0f} s in the steps; {path}")
    data.update(complete=True, ok=ok, failed=bad, steps_seconds=round(total, 1))
    _write_json(path, data)
    return 0 if ok else 1


# ------------------------------------------------------------------ the measured steps
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes of the measured steps."""

    size: int
    """Output side (px)."""
    batches: tuple[int, ...]
    """Batches of the dali_gpu and kernels steps."""
    batch_size: int
    """Batch of the loader and end_to_end steps (the paper's 30)."""
    dali_seconds: float
    kernel_repeats: int
    loader_seconds: float
    e2e_seconds: float
    encoder: str
    copies: int
    """The real series is written this many times (as that many cases) into the zstd store."""
    pool: int
    """HU slices held in memory for dali_gpu and kernels."""
    smoke_batch: int
    h2d_mib: int
    workers: int | None = None
    """DALI threads / reader processes (None: the CPU count, at most 16)."""

    def n_workers(self) -> int:
        if self.workers:
            return self.workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(16, cpus or 1))


SIZES = {
    "visit": Sizes(size=256, batches=(30, 256), batch_size=30, dali_seconds=5.0, kernel_repeats=20,
                   loader_seconds=10.0, e2e_seconds=10.0, encoder="mit_b2", copies=32, pool=512,
                   smoke_batch=4, h2d_mib=256),
    "rehearse": Sizes(size=64, batches=(4, 8), batch_size=4, dali_seconds=1.0, kernel_repeats=3,
                      loader_seconds=2.0, e2e_seconds=2.0, encoder="mit_b0", copies=2, pool=16,
                      smoke_batch=2, h2d_mib=16, workers=1),
    "tiny": Sizes(size=32, batches=(2,), batch_size=2, dali_seconds=0.3, kernel_repeats=2,
                  loader_seconds=0.6, e2e_seconds=0.5, encoder="mit_b0", copies=2, pool=4,
                  smoke_batch=2, h2d_mib=4, workers=1),
}

GPU_TEST_MODULES = ("tests/pipelines/test_kernels.py", "tests/pipelines/test_dali.py",
                    "tests/pretrain/test_gpu.py", "tests/bench/test_bench.py",
                    "tests/finetune/test_finetune.py")
SERIES = "totalseg-dicom-series"


def shared_data() -> Path:
    """Where the tests look for the real samples: <repo>/../shared/data."""
    return (REPO / ".." / "shared" / "data").resolve()


def check_samples(data: Path, manifest: Path | None) -> dict:
    """Every real sample there: README.md and the DICOM series (what the GPU tests read), and
    every file of the manifest's shared-data/ lines with its sha256. Raises RuntimeError."""
    missing = [str(data / name) for name in ("README.md", SERIES) if not (data / name).exists()]
    dicoms = sorted((data / SERIES).glob("*.dcm")) if (data / SERIES).is_dir() else []
    if not dicoms:
        missing.append(f"{data / SERIES}/*.dcm")
    checked = 0
    if manifest is not None and manifest.is_file():
        for line in manifest.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if not name.startswith("shared-data/"):
                continue
            f = data / name[len("shared-data/"):]
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                missing.append(f"{f} (missing or changed)")
            checked += 1
    if missing:
        raise RuntimeError(f"real samples missing: {', '.join(missing)}")
    return {"folder": str(data), "dicom_files": len(dicoms), "manifest_files_checked": checked}


def _pipeline_config(sizes: Sizes, device: str):
    from tcsmae.bench.config import BenchConfig, train_config

    cfg = BenchConfig(device=device, workers=sizes.n_workers(), batch_size=sizes.batch_size,
                      size=sizes.size, seconds=sizes.e2e_seconds, encoder=sizes.encoder)
    return cfg, train_config(cfg)


def _stores(work: Path) -> tuple[Path, Path]:
    return work / "real.zarr", work / "real-copies.zarr"


def build_stores(work: Path, copies: int) -> dict:
    """The real DICOM series converted by `tcsmae convert` (zstd), then written `copies`
    times as that many cases into a second zstd store (20 slices are less than a batch)."""
    import numpy as np

    from tcsmae.cli import main as cli
    from tcsmae.store.reader import open_store
    from tcsmae.store.writer import StoreWriter

    real, many = _stores(work)
    t0 = time.perf_counter()
    if not real.exists():
        code = cli(["convert", str(shared_data() / SERIES), "-o", str(real), "--workers", "1"])
        if code != 0:
            raise RuntimeError(f"tcsmae convert exited {code}")
    store = open_store(real)
    (cid,) = store.case_ids
    hu = np.asarray(store.image(cid)[:])
    attrs = store.case_attrs(cid)
    if not many.exists():
        with StoreWriter(many, codec="zstd") as w:
            for k in range(copies):
                w.write_case(f"{cid}-{k:02d}", hu, {**attrs, "source_sha256": f"{cid}-{k:02d}"})
    copied = open_store(many)
    return {"real": str(real), "copies": str(many), "series_slices": int(hu.shape[0]),
            "slice_shape": list(hu.shape[1:]), "dtype": str(hu.dtype), "codec": "zstd",
            "copies_cases": len(copied.case_ids), "copies_slices": int(copied.n_slices),
            "seconds": round(time.perf_counter() - t0, 2)}


def _cuda(device: str) -> bool:
    return device == "cuda"


def h2d_bandwidth(mib: int, repeats: int = 10) -> dict:
    """Host-to-device copies of `mib` MiB timed with CUDA events: pinned and pageable GB/s
    (medians; 1 GB = 1e9 bytes)."""
    import torch

    n = mib * MIB
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {"mib": mib, "repeats": repeats}
    for name, host in (("pinned", torch.ones(n, dtype=torch.uint8).pin_memory()),
                       ("pageable", torch.ones(n, dtype=torch.uint8))):
        times = []
        for i in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        out[f"{name}_gb_per_s"] = n / 1e9 / (statistics.median(times) / 1e3)
    return out


def step_smoke(sizes: Sizes, device: str, work: Path, manifest: Path | None) -> dict:
    """Versions, the real samples, the stores, one pipeline iteration, pinned H2D GB/s."""
    import torch

    from tcsmae.bench.machine import machine_info
    from tcsmae.pipelines.loader import make_loader

    out = {"machine": machine_info(), "samples": check_samples(shared_data(), manifest)}
    out["stores"] = build_stores(work, sizes.copies)  # first: the later steps need them
    if _cuda(device):
        query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm"
        try:
            smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False)
            out["nvidia_smi"] = {"fields": query, "value": (smi.stdout or smi.stderr).strip()}
        except OSError as exc:
            out["nvidia_smi"] = {"fields": query, "value": f"{type(exc).__name__}: {exc}"}
        print(out["nvidia_smi"]["value"])
        if not torch.cuda.is_available():
            raise StepFailed("--device cuda: torch sees no CUDA GPU", out)
    _, tcfg = _pipeline_config(sizes, device)
    t0 = time.perf_counter()
    loader = make_loader(out["stores"]["copies"], tcfg.pipeline, sizes.smoke_batch, device=device,
                         num_threads=1, py_workers=0, device_id=0 if _cuda(device) else None)
    batch = next(iter(loader))
    original, mask = batch["original"], batch["mask"]
    if not bool(torch.isfinite(original).all()):
        raise RuntimeError("the pipeline's first batch holds non-finite values")
    out["pipeline"] = {"shape": list(original.shape), "dtype": str(original.dtype),
                       "device": str(original.device),
                       "masked_fraction": float((mask == 0).float().mean()),
                       "seconds": round(time.perf_counter() - t0, 2)}
    del loader
    out["h2d"] = (h2d_bandwidth(sizes.h2d_mib) if _cuda(device)
                  else {"skipped": "no CUDA (rehearsal)"})
    return out


def _junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = sorted({(sk.get("message") or "")[:120] for sk in root.iter("skipped")})
    return counts


def step_gpu_tests(sizes: Sizes, device: str, work: Path, manifest: Path | None) -> dict:
    """cuda: `pytest -x -m gpu` on the GPU test modules (CI=true: missing data fails); any
    skip fails the step. cpu: the same selection collected only (no CUDA to run it)."""
    samples = check_samples(shared_data(), manifest)
    modules = [str(REPO / m) for m in GPU_TEST_MODULES]
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q"]
    env = {**os.environ, "CI": "true"}
    if not _cuda(device):
        proc = subprocess.run(base + ["--co", *modules], env=env, cwd=work,
                              capture_output=True, text=True, check=False)
        print(proc.stdout[-3000:], proc.stderr[-2000:])
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        if proc.returncode != 0 or not ids:
            raise RuntimeError(f"collecting the GPU tests: exit {proc.returncode}, {len(ids)} collected")
        return {"collected": len(ids), "modules": list(GPU_TEST_MODULES), "samples": samples}
    xml = work / "gpu-tests.xml"
    proc = subprocess.run(base + ["-x", "-rs", "--timeout=120", f"--junitxml={xml}", *modules],
                          env=env, cwd=work, check=False)
    counts = _junit_counts(xml) if xml.is_file() else {}
    result = {"rc": proc.returncode, **counts, "modules": list(GPU_TEST_MODULES)}
    if proc.returncode != 0 or not counts.get("tests") or counts.get("skipped"):
        raise StepFailed(f"pytest exit {proc.returncode}: {counts.get('tests', 0)} tests, "
                         f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped "
                         "(none may skip on a GPU)", result)
    return result


def _pool(sizes: Sizes, work: Path, pad_hu: float, seed: int):
    from tcsmae.bench.data import slice_pool
    from tcsmae.store.reader import open_store

    _, many = _stores(work)
    if not many.exists():
        raise RuntimeError(f"{many} is missing: the smoke step builds it")
    n = max(sizes.pool, 2 * max(sizes.batches))
    return slice_pool(open_store(many), n, seed=seed, pad_hu=pad_hu)[1]


def step_dali_gpu(sizes: Sizes, device: str, work: Path, manifest: Path | None) -> dict:
    """The DALI GPU path (dali_cpu on the CPU) on real slices in pinned memory, per batch."""
    from tcsmae.bench.stages import measure_preprocess_stage

    _, tcfg = _pipeline_config(sizes, device)
    pcfg = tcfg.pipeline
    hu = _pool(sizes, work, pcfg.pad_hu, pcfg.seed)
    path = "dali_gpu" if _cuda(device) else "dali_cpu"
    out = {"pool": {"slices": len(hu), "shape": list(hu.shape[1:]), "dtype": str(hu.dtype),
                    "from": "real series (zstd store copies)"}, "size": pcfg.size, "batches": {}}
    for b in sizes.batches:
        r = measure_preprocess_stage(hu, pcfg, device, sizes.n_workers(), b, sizes.dali_seconds,
                                     which=(path,))
        out["batches"][str(b)] = {"path": path, **r[path]}
        print(f"{path} batch {b}: {r[path]['slices_per_s']:.0f} slices/s", flush=True)
    return out


def time_kernels(hu, pcfg, device: str, batch: int, repeats: int) -> dict:
    """The transform's kernels alone on one batch of `hu` (N >= batch, (N, S, S) int16 HU):
    cuda: the CuPy kernels timed with CUDA events (and the pinned host-to-device copy of the
    HU); cpu: their NumPy twins (the CPU path, one thread) with a host clock. Medians in ms.
    Returns {h2d_ms, window_edges_ms, resize_ms, mask_apply_ms, chain_ms, chain_slices_per_s}."""
    import numpy as np

    from tcsmae.pipelines import kernels
    from tcsmae.pipelines.resize import resize_bilinear
    from tcsmae.pipelines.source import draw_mask

    x = np.ascontiguousarray(hu[:batch])
    size = pcfg.size
    chosen = np.stack([draw_mask(pcfg, 0, i, (size, size)) for i in range(batch)])
    args = (pcfg.lung_window, pcfg.mediastinal_window, pcfg.edge_scaling, pcfg.edge_clip)
    lo, hi = pcfg.hu_range
    if _cuda(device):
        import cupy as cp
        import cupyx

        pinned = cupyx.empty_pinned(x.shape, x.dtype)
        pinned[...] = x
        d_hu, d_chosen = cp.empty(x.shape, x.dtype), cp.asarray(chosen)
        d_hu.set(pinned)
        stack = kernels.window_edges_cupy(d_hu, *args)
        small = kernels.resize_cupy(stack, size)
        steps = {
            "h2d_ms": lambda: d_hu.set(pinned),
            "window_edges_ms": lambda: kernels.window_edges_cupy(d_hu, *args),
            "resize_ms": lambda: kernels.resize_cupy(stack, size),
            "mask_apply_ms": lambda: kernels.tissue_mask_apply_cupy(small, d_chosen, lo, hi),
            "chain_ms": lambda: kernels.tissue_mask_apply_cupy(
                kernels.resize_cupy(kernels.window_edges_cupy(d_hu, *args), size), d_chosen, lo, hi),
        }

        def clock(fn) -> float:
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return cp.cuda.get_elapsed_time(start, end)
        timer = "CUDA events (CuPy kernels, current stream)"
    else:
        stack = kernels.window_edges_numpy(x, *args)
        small = resize_bilinear(stack, size)
        steps = {
            "h2d_ms": None,
            "window_edges_ms": lambda: kernels.window_edges_numpy(x, *args),
            "resize_ms": lambda: resize_bilinear(stack, size),
            "mask_apply_ms": lambda: kernels.tissue_mask_apply_numpy(small, chosen, lo, hi),
            "chain_ms": lambda: kernels.tissue_mask_apply_numpy(
                resize_bilinear(kernels.window_edges_numpy(x, *args), size), chosen, lo, hi),
        }

        def clock(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        timer = "host clock (NumPy twins and torch resize: the CPU path, one thread)"
    out: dict = {"batch": batch, "hu_shape": list(x.shape[1:]), "size": size, "timer": timer,
                 "repeats": repeats}
    for name, fn in steps.items():
        if fn is None:
            out[name] = None
            continue
        for _ in range(2):
            fn()
        times = [clock(fn) for _ in range(repeats)]
        out[name] = statistics.median(times)
        out[name.replace("_ms", "_min_ms")] = min(times)
    out["chain_slices_per_s"] = batch / (out["chain_ms"] / 1e3)
    return out


def step_kernels(sizes: Sizes, device: str, work: Path, manifest: Path | None,
                 json_path: Path | None = None) -> dict:
    """time_kernels at each batch, set against the dali_gpu step's rate at that batch:
    kernel_share_of_dali = chain time / DALI's time per batch; the rest is DALI's own
    overhead (and, on the GPU, the host-to-device copy, h2d_ms)."""
    _, tcfg = _pipeline_config(sizes, device)
    pcfg = tcfg.pipeline
    hu = _pool(sizes, work, pcfg.pad_hu, pcfg.seed)
    dali = {}
    if json_path is not None:
        stage = _read_json(json_path).get("stages", {}).get("dali_gpu", {})
        dali = (stage.get("result") or {}).get("batches", {})
    out = {"batches": {}}
    for b in sizes.batches:
        r = time_kernels(hu, pcfg, device, b, sizes.kernel_repeats)
        rate = (dali.get(str(b)) or {}).get("slices_per_s")
        if rate:
            per_batch_ms = b / rate * 1e3
            r["dali_ms_per_batch"] = per_batch_ms
            r["kernel_share_of_dali"] = r["chain_ms"] / per_batch_ms
            r["dali_overhead_ms"] = per_batch_ms - r["chain_ms"] - (r["h2d_ms"] or 0.0)
        out["batches"][str(b)] = r
        print(f"kernels batch {b}: chain {r['chain_ms']:.3f} ms "
              f"({r['chain_slices_per_s']:.0f} slices/s)", flush=True)
    return out


def step_loader(sizes: Sizes, device: str, work: Path, manifest: Path | None) -> dict:
    """The store loader (zstd store of the real series' copies -> DALI -> batches)."""
    from tcsmae.bench.stages import measure_loader

    _, tcfg = _pipeline_config(sizes, device)
    _, many = _stores(work)
    r = measure_loader(many, tcfg.pipeline, device, sizes.batch_size, sizes.n_workers(),
                       sizes.loader_seconds)
    return {**r, "store": str(many), "store_kind": f"real series x{sizes.copies} (zstd)"}


def step_end_to_end(sizes: Sizes, device: str, work: Path, manifest: Path | None) -> dict:
    """The loader feeding training steps (the bench's end_to_end) on the copies store."""
    from tcsmae.bench.training import build_trainer, flops_per_pair, measure_end_to_end

    _, tcfg = _pipeline_config(sizes, device)
    _, many = _stores(work)
    trainer = build_trainer(tcfg, device)
    flops = flops_per_pair(trainer)
    r = measure_end_to_end(trainer, many, tcfg.pipeline, sizes.batch_size, sizes.n_workers(),
                           sizes.e2e_seconds, flops)
    return {**r, "encoder": sizes.encoder, "size": sizes.size, "store": str(many),
            "store_kind": f"real series x{sizes.copies} (zstd)"}


class StepFailed(RuntimeError):
    """A step that ran but did not pass; `result` is still recorded."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


STEPS = {"smoke": step_smoke, "gpu_tests": step_gpu_tests, "dali_gpu": step_dali_gpu,
         "kernels": step_kernels, "loader": step_loader, "end_to_end": step_end_to_end}


def run_step(name: str, json_path: Path, work: Path, device: str, sizes: str,
             manifest: Path | None = None) -> int:
    """Run one measured step; its result (or error) goes into visit.json at once."""
    fn = STEPS[name]
    json_path, work = json_path.resolve(), work.resolve()
    manifest = manifest.resolve() if manifest else None
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the repo root on sys.path would shadow the installed package
    extra = {"json_path": json_path} if name == "kernels" else {}
    t0 = time.perf_counter()
    try:
        result = fn(SIZES[sizes], device, work, manifest, **extra)
        update_stage(json_path, name, result=result, step_seconds=round(time.perf_counter() - t0, 2))
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    except Exception as exc:  # recorded, and the step's exit code says it failed
        text = f"{type(exc).__name__}: {exc}"
        partial = exc.result if isinstance(exc, StepFailed) else {}
        update_stage(json_path, name, result={**partial, "error": text},
                     step_seconds=round(time.perf_counter() - t0, 2))
        print(f"[{name}] failed: {text}\n{traceback.format_exc()}", flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plan", help="print the calls of a visit")
    p.add_argument("--dry", action="store_true", help="nominal sizes when nothing was downloaded")
    p.add_argument("--part-mib", type=int, default=PART_MIB)
    p = sub.add_parser("init", help="start OUT/visit.json")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--mode", choices=("visit", "rehearse"), required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--sizes", choices=tuple(SIZES), required=True)
    p.add_argument("--preamble", type=Path, default=None, help="text file of the call's first lines")
    p = sub.add_parser("step", help="run one measured step")
    p.add_argument("name", choices=tuple(STEPS))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--sizes", choices=tuple(SIZES), required=True)
    p.add_argument("--manifest", type=Path, default=None)
    p = sub.add_parser("record", help="record a step's status")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--started", type=float, default=0.0, help="time.time() at the step's start")
    p.add_argument("--log", default="")
    p.add_argument("--skipped", default=None, metavar="WHY")
    p = sub.add_parser("summary", help="print the per-step summary; exit 1 unless all ok")
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("limit", help="print a step's time limit (s)")
    p.add_argument("stage", choices=STAGES)
    args = parser.parse_args(argv)

    if args.what == "plan":
        try:
            print(format_plan(current_plan(REPO, args.dry, args.part_mib)))
        except PlanError as exc:
            print(f"plan: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.what == "init":
        text = args.preamble.read_text() if args.preamble and args.preamble.is_file() else ""
        init_visit(args.json, args.mode, args.device, args.sizes, text)
        return 0
    if args.what == "step":
        return run_step(args.name, args.json, args.work, args.device, args.sizes, args.manifest)
    if args.what == "record":
        record(args.json, args.stage, args.rc, args.started or time.time(),
               STEP_LIMITS[args.stage], args.log, args.skipped)
        return 0
    if args.what == "summary":
        return summary(args.json)
    if args.what == "limit":
        print(STEP_LIMITS[args.stage])
        return 0
    return 2


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    raise SystemExit(main())
