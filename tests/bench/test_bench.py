"""`tcsmae bench` end to end on a tiny phantom store (CPU, ~30 s), plus its small pieces."""

from __future__ import annotations

import json
import math

import pytest

from tcsmae import bench
from tcsmae.cli import main
from tcsmae.errors import UserError

MEASURED = ("read.slices_per_s", "read.mb_per_s", "preprocess.baseline.slices_per_s",
            "preprocess.dali_cpu.slices_per_s", "train_step.pairs_per_s", "train_step.peak_mem_gb",
            "end_to_end.pairs_per_s")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return bench.phantom_store(tmp_path_factory.mktemp("phantom"), size=64, cases=2, slices=8,
                               processes=1)


@pytest.fixture(scope="module")
def bench_run(tiny_store, tmp_path_factory):
    """One smallest-settings run through the CLI; returns (exit code, result dict, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench") / "result.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", "--quick", "--data", str(tiny_store), "--device", "cpu",
                     "--workers", "1", "--batch-size", "4", "--size", "64", "--seconds", "0.3",
                     "--pool-slices", "8", "--batch-sweep", "4", "--out", str(out)])
    return code, json.loads(out.read_text()), stdout.getvalue(), out


def test_phantom_store_is_complete(tiny_store):
    from tcsmae.store.reader import open_store

    store = open_store(tiny_store)
    assert store.n_slices == 16 and len(store.case_ids) == 2
    assert store.image(store.case_ids[0]).shape == (8, 64, 64)
    assert store.has_labels(store.case_ids[1])
    # a second call reuses the committed store instead of rebuilding it
    mtime = (tiny_store / "slice_index.npz").stat().st_mtime_ns
    assert bench.phantom_store(tiny_store.parent, size=64, cases=2, slices=8) == tiny_store
    assert (tiny_store / "slice_index.npz").stat().st_mtime_ns == mtime


def test_bench_writes_every_figure(bench_run):
    code, result, _, out = bench_run
    assert code == 0, result["errors"]
    assert result["errors"] == {} and result["complete"] is True
    for key in bench.FIGURE_KEYS:  # every fixed key is present (null allowed)
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            node = node[part]
            if node is None:  # a whole unmeasured path (dali_gpu) is null
                break
        else:
            assert leaf in node, key
    for key in MEASURED:
        value = bench.figure(result, key)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    stall = result["end_to_end"]["data_stall"]
    assert isinstance(stall, float) and 0.0 <= stall < 1.0
    # no leftovers of the atomic write
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_batch_sweep_is_recorded(bench_run):
    # one size only: every new batch shape costs seconds of kernel set-up on this CPU
    _, result, _, _ = bench_run
    train = result["train_step"]
    assert [r["batch_size"] for r in train["batch_sweep"]] == [4]
    assert train["batch_sweep"][0]["pairs_per_s"] > 0
    assert train["best_batch_size"] == 4
    assert "at_best_batch" not in result["end_to_end"]  # best = configured: no second run


def test_bench_without_gpu_leaves_gpu_figures_null(bench_run):
    _, result, _, _ = bench_run
    assert result["preprocess"]["dali_gpu"] is None
    assert result["ratios"]["dali_gpu_over_baseline"] is None
    assert result["train_step"]["mfu"] is None  # no GPU peak on the CPU


def test_ratios_are_quotients_of_the_same_run(bench_run):
    _, result, _, _ = bench_run
    base = result["preprocess"]["baseline"]["slices_per_s"]
    cpu = result["preprocess"]["dali_cpu"]["slices_per_s"]
    assert result["ratios"]["dali_cpu_over_baseline"] == pytest.approx(cpu / base, rel=1e-12)
    # MB/s is the slice rate times the stored bytes of a 64x64 int16 slice
    read = result["read"]
    assert read["stored_dtype"] == "int16" and read["slice_shape"] == [64, 64]
    assert read["mb_per_s"] == pytest.approx(read["slices_per_s"] * 64 * 64 * 2 / 1e6)
    assert read["zarr_slices_per_s"] > 0
    assert read["direct_over_zarr"] == pytest.approx(read["slices_per_s"] / read["zarr_slices_per_s"])


def test_machine_and_config_are_recorded(bench_run):
    _, result, stdout, _ = bench_run
    machine = result["machine"]
    assert isinstance(machine["cpu_model"], str) and machine["cpu_count"] >= 1
    assert machine["gpu"] is None or isinstance(machine["gpu"], str)
    for name in ("torch", "dali", "cupy", "zarr"):
        assert isinstance(machine["versions"][name], str), name
    cfg = result["config"]
    assert cfg["bench"]["encoder"] == "mit_b0" and cfg["bench"]["size"] == 64
    assert cfg["train"]["pipeline"]["size"] == 64 and cfg["train"]["model"]["encoder"] == "mit_b0"
    assert cfg["data"]["slices"] == 16 and cfg["data"]["pool_dtype"] == "int16"
    assert result["command"].startswith("tcsmae bench") and "--quick" in result["command"]
    assert result["train_step"]["flops_per_pair"] > 1e6
    assert "| preprocess | dali_cpu / baseline |" in stdout


def test_markdown_table_marks_missing_figures():
    result = {"machine": {"gpu": None, "cpu_model": "x", "cpu_count": 2},
              "config": {"bench": {"workers": 2, "batch_size": 4, "encoder": "mit_b0", "size": 64,
                                   "device": "cpu"}},
              "read": {"slices_per_s": 12.5}, "preprocess": {"baseline": None}, "errors": {}}
    table = bench.markdown_table(result)
    assert "| read | slices/s, 1 process | 12.5 |" in table
    assert "| preprocess | dali_gpu slices/s | - |" in table


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="multiple of 32"):
        bench.BenchConfig(size=100)
    with pytest.raises(UserError, match="--seconds"):
        bench.BenchConfig(seconds=0)
    assert main(["bench", "--data", str(tmp_path / "missing.zarr"), "--device", "cpu",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


@pytest.mark.gpu
def test_bench_on_gpu_measures_gpu_figures(tiny_store, tmp_path):
    """On a GPU machine: dali_gpu, its ratio, MFU and the GPU peak memory are measured."""
    out = tmp_path / "gpu.json"
    code = main(["bench", "--quick", "--data", str(tiny_store), "--device", "cuda",
                 "--workers", "2", "--batch-size", "4", "--size", "64", "--seconds", "0.3",
                 "--pool-slices", "8", "--batch-sweep", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result["errors"]
    gpu = result["preprocess"]["dali_gpu"]["slices_per_s"]
    base = result["preprocess"]["baseline"]["slices_per_s"]
    assert gpu > 0 and result["ratios"]["dali_gpu_over_baseline"] == pytest.approx(gpu / base, rel=1e-12)
    assert result["preprocess"]["dali_gpu_large_batch"]["slices_per_s"] > 0
    assert result["machine"]["gpu"]
    assert 0 < result["train_step"]["peak_mem_gb"] < 200
    from tcsmae.bench.probe import gpu_peak

    peak = gpu_peak(result["machine"]["gpu"])[0]
    if peak:  # a GPU of known peak: MFU is the achieved FLOP rate over it
        train = result["train_step"]
        assert train["mfu"] == pytest.approx(train["flops_per_pair"] * train["pairs_per_s"] / peak)
    assert 0 <= result["end_to_end"]["data_stall"] < 1


def test_a_failing_stage_is_recorded_and_the_rest_still_measured(tiny_store, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no model today")

    monkeypatch.setattr(bench.suite, "build_trainer", broken)  # where run_bench looks it up
    out = tmp_path / "partial.json"
    code = main(["bench", "--quick", "--data", str(tiny_store), "--device", "cpu", "--workers", "1",
                 "--batch-size", "4", "--size", "64", "--seconds", "0.2", "--pool-slices", "8",
                 "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 1
    assert result["errors"] == {"train_setup": "RuntimeError: no model today"}
    assert result["read"]["slices_per_s"] > 0 and result["preprocess"]["dali_cpu"]["slices_per_s"] > 0
    assert result["train_step"] is None and result["end_to_end"] is None
    assert result["complete"] is True


def test_unknown_encoder_is_a_user_error(tiny_store, tmp_path):
    assert main(["bench", "--quick", "--data", str(tiny_store), "--device", "cpu",
                 "--encoder", "mit_b9", "--out", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_readme_row_has_one_cell_per_column(bench_run):
    _, result, _, out = bench_run
    row = bench.readme_row(result, str(out))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 13  # the columns of bench/README.md's results table
    assert cells[0] == f"[{out.name}](results/{out.name})"
    assert cells[6] == "null"  # dali_gpu on the CPU
    assert float(cells[7]) == pytest.approx(result["ratios"]["dali_cpu_over_baseline"], abs=0.006)


def test_gpu_peak_table_tells_h100_pcie_from_sxm():
    from tcsmae.bench.probe import gpu_peak

    assert gpu_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu_peak("NVIDIA H200")[0] == 989e12
    assert gpu_peak("Tesla T4") == (None, None) and gpu_peak(None) == (None, None)


def test_loader_stage_measures_the_loader_and_its_source_alone(bench_run):
    _, result, stdout, _ = bench_run
    loader = result["loader"]
    assert loader["reader_processes"] == 1 and loader["hu_transport_dtype"] == "int16"
    for key in ("slices_per_s", "source_only_slices_per_s"):
        assert isinstance(loader[key], float) and math.isfinite(loader[key]) and loader[key] > 0, key
    assert result["ratios"]["source_only_over_read"] == pytest.approx(
        loader["source_only_slices_per_s"] / result["read"]["slices_per_s"], rel=1e-12)
    assert "| loader | slices/s, parallel source alone (reads only) |" in stdout


def test_quick_changes_the_defaults_and_flags_win():
    from argparse import ArgumentParser

    parser = ArgumentParser()
    bench.add_arguments(parser)
    quick = bench.config_from_args(parser.parse_args(["--quick", "--device", "cpu", "--out", "r.json"]))
    assert (quick.encoder, quick.size, quick.batch_size, quick.seconds, quick.pool_slices) == ("mit_b0", 128, 8, 2.0, 32)
    assert quick.batch_sweep == () and quick.quick
    args = parser.parse_args(["--quick", "--device", "cpu", "--size", "64", "--batch-sweep", "4", "8",
                              "--seconds", "1", "--out", "r.json"])
    cfg = bench.config_from_args(args)
    assert (cfg.size, cfg.batch_sweep, cfg.seconds, cfg.encoder) == (64, (4, 8), 1.0, "mit_b0")
    assert bench.command_line(args) == ("tcsmae bench --device cpu --size 64 --seconds 1.0 --quick "
                                        "--batch-sweep 4 8 --out r.json")
    full = bench.config_from_args(parser.parse_args(["--device", "cpu", "--out", "r.json"]))
    assert (full.encoder, full.size, full.batch_size, full.seconds) == ("mit_b2", 256, 8, 10.0)
    with pytest.raises(UserError, match="^--batch-sweep 4 0: batch sizes must be >= 1$"):
        bench.BenchConfig(batch_sweep=(4, 0))


def test_profile_writes_a_trace_and_the_top_kernels(tiny_store, tmp_path):
    """--profile: a torch profiler trace beside --out and the top-20 ops (self CPU time on
    the CPU) in the result and printed; --no-compile is recorded in the command."""
    import contextlib
    import io

    out = tmp_path / "prof.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", "--quick", "--data", str(tiny_store), "--device", "cpu", "--workers", "1",
                     "--batch-size", "4", "--size", "64", "--seconds", "0.2", "--pool-slices", "8",
                     "--no-compile", "--profile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result["errors"]
    prof = result["profile"]
    assert prof["device_time"] == "cpu" and prof["steps"] == 3 and prof["batch_size"] == 4
    assert 1 <= len(prof["top"]) <= 20 and prof["step_ms"] > 0
    assert all(r["self_ms"] > 0 and 0 < r["share"] <= 1 for r in prof["top"])
    assert [r["self_ms"] for r in prof["top"]] == sorted((r["self_ms"] for r in prof["top"]), reverse=True)
    trace = tmp_path / "prof.trace.json"
    assert prof["trace"] == str(trace) and json.loads(trace.read_text())["traceEvents"]
    assert "| op | calls/step | self CPU time ms/step | share |" in stdout.getvalue()
    assert result["train_step"]["compiled"] is False and result["train_step"]["compile_s"] is None
    assert result["command"].endswith("--no-compile --profile --out " + str(out))
    assert result["config"]["train"]["compile"] is False


def test_compile_defaults_to_the_device():
    from argparse import ArgumentParser

    parser = ArgumentParser()
    bench.add_arguments(parser)
    cpu = bench.config_from_args(parser.parse_args(["--device", "cpu", "--out", "r.json"]))
    assert cpu.compile is False and cpu.profile is False
    forced = bench.config_from_args(parser.parse_args(["--device", "cpu", "--compile", "--out", "r.json"]))
    assert forced.compile is True and bench.train_config(forced).compile is True
