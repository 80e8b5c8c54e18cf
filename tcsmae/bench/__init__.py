"""`tcsmae bench`: throughput of every stage, alone and together, on the same slices.

    tcsmae bench [--data STORE.zarr] [--device cpu|cuda] [--workers W] [--batch-size N]
                 [--size 256] [--seconds S] [--quick] [--encoder NAME] --out FILE.json

Stages read, preprocess, loader, train_step and end_to_end; their figures (fixed keys,
`FIGURE_KEYS`; null when not measured), the phantom store used without --data and the
results so far: bench/README.md. This face re-exports the package's names: command.py (the
CLI), config.py, data.py, machine.py, stages.py, preprocess.py, training.py, probe.py (FLOPs,
peak memory, MFU), suite.py (run_bench) and report.py (table, README row, result file).
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
