"""A result as others read it: the Markdown table printed after a run, the row of
bench/README.md's results table, and the result JSON file (written atomically)."""

from __future__ import annotations

from pathlib import Path

from tcsmae.atomic_files import write_json_atomic


def figure(result: dict, dotted: str):
    """The value at a dotted key of a result ("read.slices_per_s"); None when any part is missing."""
    value = result
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def markdown_table(result: dict) -> str:
    """The figures as a Markdown table (unmeasured -> '-')."""
    def fmt(v, digits=1):
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    g = lambda key: figure(result, key)  # noqa: E731
    bench = result["config"]["bench"]
    rows = [
        ("read", "slices/s, 1 process", fmt(g("read.slices_per_s"))),
        ("read", "MB/s of HU, 1 process", fmt(g("read.mb_per_s"))),
        ("read", "slices/s, 1 process, through zarr-python", fmt(g("read.zarr_slices_per_s"))),
        ("read", "direct / zarr-python", fmt(g("read.direct_over_zarr"), 2)),
        ("read", f"slices/s, {bench['workers']} processes", fmt(g("read.parallel_slices_per_s"))),
        ("preprocess", f"baseline (DataLoader, {bench['workers']} workers) slices/s",
         fmt(g("preprocess.baseline.slices_per_s"))),
        ("preprocess", f"dali_cpu ({bench['workers']} threads) slices/s", fmt(g("preprocess.dali_cpu.slices_per_s"))),
        ("preprocess", "dali_gpu slices/s", fmt(g("preprocess.dali_gpu.slices_per_s"))),
        ("preprocess", f"dali_gpu slices/s at batch {g('preprocess.dali_gpu_large_batch.batch_size') or '-'}",
         fmt(g("preprocess.dali_gpu_large_batch.slices_per_s"))),
        ("preprocess", "dali_cpu / baseline", fmt(g("ratios.dali_cpu_over_baseline"), 2)),
        ("preprocess", "dali_gpu / baseline", fmt(g("ratios.dali_gpu_over_baseline"), 2)),
        ("loader", f"slices/s, store -> batches on {bench['device']}, {g('loader.reader_processes') or '-'} "
         "reader processes", fmt(g("loader.slices_per_s"))),
        ("loader", "slices/s, parallel source alone (reads only)", fmt(g("loader.source_only_slices_per_s"))),
        ("loader", "source alone / read (1 process)", fmt(g("ratios.source_only_over_read"), 2)),
        ("train_step", f"pairs/s (batch {bench['batch_size']})", fmt(g("train_step.pairs_per_s"))),
        ("train_step", "peak memory GB", fmt(g("train_step.peak_mem_gb"), 2)),
        ("train_step", "MFU", fmt(g("train_step.mfu"), 3)),
        ("train_step", "best batch size", fmt(g("train_step.best_batch_size"))),
        ("end_to_end", "pairs/s", fmt(g("end_to_end.pairs_per_s"))),
        ("end_to_end", "data stall", fmt(g("end_to_end.data_stall"), 3)),
        ("end_to_end", "data stall within epochs", fmt(g("end_to_end.data_stall_within_epoch"), 3)),
        ("end_to_end", f"pairs/s at the best batch ({g('end_to_end.at_best_batch.batch_size') or '-'})",
         fmt(g("end_to_end.at_best_batch.pairs_per_s"))),
        ("end_to_end", "data stall at the best batch", fmt(g("end_to_end.at_best_batch.data_stall"), 3)),
    ]
    optional = {"dali_gpu slices/s at batch", "best batch size", "pairs/s at the best batch",
                "data stall at the best batch"}  # GPU-only rows: shown when measured
    rows = [r for r in rows if r[2] != "-" or not any(r[1].startswith(o) for o in optional)]
    m = result["machine"]
    head = (f"tcsmae bench on {m['gpu'] or 'CPU only'} / {m['cpu_model']} x{m['cpu_count']}: "
            f"{bench['encoder']} at {bench['size']}x{bench['size']}, {bench['device']}")
    lines = [head, "", "| stage | figure | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if result["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items())]
    return "\n".join(lines)


def readme_row(result: dict, name: str) -> str:
    """One row of bench/README.md's results table for a result file called `name`:

        python -c "import json, sys; from tcsmae.bench import readme_row; \
                   print(readme_row(json.load(open(sys.argv[1])), sys.argv[1]))" FILE.json
    """
    g = lambda key: figure(result, key)  # noqa: E731

    def num(key, digits=1):
        v = g(key)
        return "null" if v is None else f"{v:.{digits}f}"

    m, b = result["machine"], result["config"]["bench"]
    machine = f"{m['gpu'] or 'no GPU'}, {m['cpu_count']} x {m['cpu_model']}"
    settings = (f"{b['encoder']}, {b['size']}x{b['size']}, batch {b['batch_size']}, W = {b['workers']}, "
                f"{b['seconds']:g} s")
    cells = [f"[{Path(name).name}](results/{Path(name).name})", machine,
             f"`{result.get('command', 'tcsmae bench')}` ({settings})",
             f"{num('read.slices_per_s', 0)} / {num('read.parallel_slices_per_s', 0)}",
             num("preprocess.baseline.slices_per_s"), num("preprocess.dali_cpu.slices_per_s"),
             num("preprocess.dali_gpu.slices_per_s"), num("ratios.dali_cpu_over_baseline", 2),
             num("ratios.dali_gpu_over_baseline", 2), num("train_step.pairs_per_s"),
             num("train_step.peak_mem_gb"), num("end_to_end.pairs_per_s"),
             num("end_to_end.data_stall", 3)]
    return "| " + " | ".join(cells) + " |"


def _clean(value):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    import math

    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _clean(value.item())
    return value


def write_result(result: dict, out: str | Path) -> Path:
    """Write the result JSON atomically (temp file in the same folder + os.replace)."""

    return write_json_atomic(out, _clean(result), indent=2, allow_nan=False)

