"""`tcsmae bench`: throughput of every stage, alone and together, on the same slices.

    tcsmae bench [--data STORE.zarr] [--device cpu|cuda] [--workers W] [--batch-size N]
                 [--size 256] [--seconds S] [--quick] [--encoder NAME] --out FILE.json

Stages (each capped by --seconds of timed work after a short warm-up):

    read         Zarr slice reads through the store API, one process and W processes:
                 slices/s and MB/s of HU as stored (int16 = 2 bytes per pixel)
    preprocess   the same transform (windows, Sobel edges, resize, tissue mask) from HU
                 batches already in host memory (pinned for the GPU): baseline = plain torch
                 DataLoader with W workers running NumPy/SciPy, dali_cpu = the package's
                 CPU path with W threads, dali_gpu = the GPU path (null without a GPU)
    train_step   training steps on in-memory batches (pairs/s, peak memory, MFU on a GPU
                 from FLOPs counted by torch.utils.flop_counter against the GPU's dense
                 bf16 peak, e.g. 989 TFLOP/s for an H100 SXM)
    end_to_end   the store loader feeding training: pairs/s and data_stall = time spent in
                 next(loader) / wall time (the GPU is synchronised after every step, so
                 kernel time is never charged to the loader)

With no --data, phantom chest CT at 512x512 (tcsmae.convert.phantom) is written into a
store in the cache ($TCSMAE_CACHE or ~/.cache/tcsmae) once. The JSON result holds
`machine`, `config` and the figures under fixed keys (see `FIGURE_KEYS`); a figure that was
not measured is null. `--quick` is the demo preset (mit_b0, 128x128, batch 8, 2 s a stage).

The package, one file per part of the run:

    command.py   the CLI: flags -> BenchConfig -> run_bench -> result file and table
    config.py    BenchConfig, and the pretraining config it measures
    data.py      the cached phantom store and the in-memory slice pool
    machine.py   CPU, GPU and package versions (GPU bf16 peaks: tcsmae.engine.gpu_peak)
    stages.py    read and preprocess stages, and the timed loop every stage uses
    training.py  train_step, batch sweep, FLOP count and end_to_end on one Trainer
    suite.py     run_bench: every stage in order into one result dict
    report.py    the Markdown table, bench/README.md's row, the result JSON file
"""

from tcsmae.bench.command import HELP, add_arguments, command_line, config_from_args, run
from tcsmae.bench.config import BenchConfig, train_config
from tcsmae.bench.data import default_phantom, slice_pool
from tcsmae.bench.machine import machine_info
from tcsmae.bench.report import figure, markdown_table, readme_row, write_result
from tcsmae.bench.stages import measure_preprocess_stage, measure_read, timed
from tcsmae.bench.suite import FIGURE_KEYS, run_bench
from tcsmae.bench.training import (
                                   Trainer,
                                   batch_sweep,
                                   build_trainer,
                                   flops_per_pair,
                                   measure_end_to_end,
                                   measure_train,
)
from tcsmae.phantom.store import PHANTOM_VERSION, phantom_store

__all__ = [
    "HELP", "add_arguments", "command_line", "config_from_args", "run",
    "BenchConfig", "train_config",
    "PHANTOM_VERSION", "default_phantom", "phantom_store", "slice_pool",
    "machine_info",
    "figure", "markdown_table", "readme_row", "write_result",
    "measure_preprocess_stage", "measure_read", "timed",
    "FIGURE_KEYS", "run_bench",
    "Trainer", "batch_sweep", "build_trainer", "flops_per_pair", "measure_end_to_end", "measure_train",
]
