"""PyTorch-facing loader: store -> DALI pipeline -> dict of torch tensors on the device.

    loader = make_loader("ct.zarr", PipelineConfig(), batch_size=30, device="cuda")
    for batch in loader:      # one epoch: original, masked (N, 3, H, W), mask (N, 1, H, W),
        ...                   # case_index, z (N,) int64; label (N, H, W) with labels
    loader.position           # (epoch, step) of the next batch, for a checkpoint

Resuming at (epoch, step) yields the same batches and masks as an uninterrupted run; the
keys, dtypes and fine-tuning mode are described at `SliceLoader`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import threading

from tcsmae.errors import UserError
from tcsmae.pipelines.config import PipelineConfig
from tcsmae.pipelines.graph import processing_graph
from tcsmae.pipelines.kernels import split_packed
from tcsmae.pipelines.source import SliceSource

_LAYOUTS = {"hu": "HW", "draw": None, "case_index": None, "z": None, "affine": None,
            "label": "HW"}
_STACKED_LAYOUTS = {"hu": None, "draw": None, "case_index": None, "z": None, "label": "CHW"}


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """SIGINT ignored while DALI starts its reader processes, which keep that setting (fork and
    spawn alike): a Ctrl-C reaches the whole process group, and the training process, not its
    readers, decides how to stop (tcsmae.stopping: finish the step, save). DALI still ends the
    readers with the pipeline. Outside the main thread (no signal handling there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_USER_ERROR_LINE = "tcsmae.errors.UserError: "


@contextlib.contextmanager
def _readers_user_errors():
    """A UserError raised in a reader process (a damaged store, say) reaches the caller as
    itself: DALI re-raises it as a generic exception carrying the reader's traceback text,
    which the CLI would print in full (~100 lines) instead of the one-line message."""
    try:
        yield
    except StopIteration:
        raise
    except Exception as exc:
        seen: BaseException | None = exc
        while seen is not None:
            if isinstance(seen, UserError):
                raise seen from None
            for line in str(seen).splitlines():
                if line.startswith(_USER_ERROR_LINE):
                    raise UserError(line[len(_USER_ERROR_LINE):]) from exc
            seen = seen.__cause__ or seen.__context__
        if _SHM_FAILURE in str(exc):
            raise UserError(f"the loader's reader processes could not hand over a batch ({exc}): they pass "
                            f"batches through shared memory (/dev/shm, {_shm_size()}); give it more room "
                            "(docker: --shm-size 8g or --ipc=host) or lower --workers / --batch-size") from exc
        raise


_SHM_FAILURE = "Worker data receiving interrupted"


def _shm_size() -> str:
    """The size of /dev/shm as text, for the message above."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return "size unknown"
    return f"{stat.f_blocks * stat.f_frsize / 2**20:.0f} MiB"


def _start_method(gpu: bool) -> str:
    """'fork' is only safe before CUDA is initialised in this process; else 'spawn'."""
    if gpu:
        return "spawn"
    from nvidia.dali import backend

    return "spawn" if backend.IsDriverInitialized() else "fork"


def source_queue_depth(py_workers: int) -> int:
    """Batches the parallel source reads ahead: one per reader process, at least two. DALI's
    default of one keeps a single batch in flight, so one reader works while the others wait."""
    return max(2, int(py_workers))


def build_pipeline(source, cfg: PipelineConfig, batch_size: int, device_id: int | None,
                   num_threads: int = 2, py_workers: int = 1, prefetch: int = 2):
    """A DALI pipeline: `source` (SliceSource-like batch callable) -> processing_graph.

    Outputs, in order: packed (8, H, W) float32 (kernels.PACKED), case_index (1,), z (1,),
    and label (1, H, W) int16 if the source has labels; with a stacked source the DALI
    batch size is 1 and each output carries the batch: (N, 8, H, W), (N, 1), (N, 1),
    (N, H, W). py_workers = 0 runs the source in the main process.
    """
    from nvidia.dali import fn, pipeline_def

    names = source.output_names
    stacked = source.stacked
    layouts = _STACKED_LAYOUTS if stacked else _LAYOUTS

    @pipeline_def
    def pipe():
        parallel = {"parallel": True, "prefetch_queue_depth": source_queue_depth(py_workers)} if py_workers > 0 else {}
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True, batch_info=True,
                                   layout=[layouts[n] for n in names], **parallel)
        node = dict(zip(names, nodes))
        graph = processing_graph(node["hu"], node["draw"], cfg, device_id,
                                 affine=node.get("affine"), label=node.get("label"),
                                 cpu_threads=num_threads, stacked=stacked)
        result = [graph["packed"], node["case_index"], node["z"]]
        if "label" in graph:
            result.append(graph["label"])
        return tuple(result)

    kwargs = {}
    if py_workers > 0:
        kwargs = {"py_num_workers": py_workers,
                  "py_start_method": _start_method(device_id is not None)}
    return pipe(batch_size=1 if stacked else batch_size, num_threads=num_threads,
                device_id=device_id, prefetch_queue_depth=prefetch, seed=cfg.seed, **kwargs)


def build_source_pipeline(source, batch_size: int, py_workers: int):
    """The parallel external source alone (reads only, no processing): a CPU pipeline whose
    outputs are the source's, to measure what the reader processes deliver."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def pipe():
        return tuple(fn.external_source(source=source, num_outputs=len(source.output_names), batch=True,
                                        batch_info=True, parallel=True,
                                        prefetch_queue_depth=source_queue_depth(py_workers)))

    return pipe(batch_size=1 if source.stacked else batch_size, num_threads=1, device_id=None,
                py_num_workers=py_workers, py_start_method=_start_method(False))


class SliceLoader:
    """Iterates one epoch per `for` loop; build with make_loader.

    Each batch: "original", "masked" (N, 3, H, W) cfg.dtype in 0..1; "mask" (N, 1, H, W)
    float32 0|1; "case_index", "z" (N,) int64, which slice each sample is; after
    set_network_inputs also "original_input" (and "masked") in the network's dtype and
    layout; with labels "label" (N, H, W) int64, masking off (masked == original) and labels
    resampled nearest-neighbour on the same geometry. `position` is (epoch, step) of the next
    batch; set_epoch(e) starts epoch e at step 0.
    """

    def __init__(self, store_path, cfg: PipelineConfig, batch_size: int, device: str = "cpu",
                 rank: int = 0, world_size: int = 1, epoch: int = 0, step: int = 0,
                 with_labels: bool = False, num_threads: int = 2, py_workers: int = 1,
                 device_id: int | None = None, prefetch: int = 2,
                 stacked: bool | None = None, case_ids: list[str] | None = None):
        if device not in ("cpu", "cuda"):
            raise UserError(f"device {device!r}: choose 'cpu' or 'cuda'")
        if with_labels:
            cfg = dataclasses.replace(cfg, masking="none")
        if device == "cuda" and device_id is None:
            device_id = int(os.environ.get("LOCAL_RANK", 0))
        self.store_path = store_path
        self.cfg = cfg
        self.batch_size = batch_size
        self.device = device
        self.device_id = device_id if device == "cuda" else None
        self.rank, self.world_size = rank, world_size
        self.with_labels = with_labels
        self.num_threads, self.py_workers, self.prefetch = num_threads, py_workers, prefetch
        self.epoch, self.step = int(epoch), int(step)
        self._iterator = None
        self._end_pending = False  # last batch of an epoch taken, DALI's end-of-epoch not yet
        self._network: tuple | None = None  # (torch dtype, memory format) of set_network_inputs
        self._in_flight: collections.deque = collections.deque()  # (CUDA event, DALI's tensors)
        self._built_at: tuple[int, int] | None = None
        self._source = SliceSource(store_path, cfg, batch_size, rank, world_size, epoch, step,
                                   with_labels, stacked, case_ids)
        if cfg.size == 0 and len(self._source._output_grids()) > 1:
            raise UserError(f"{store_path}: its slices have different grids "
                            f"{sorted(self._source._output_grids())}; size=0 keeps them, so "
                            "they cannot form one batch tensor: set a positive size")

    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        return self._source.n_batches

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, step): the next batch to be yielded; save it to resume."""
        return self.epoch, self.step

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at step 0 on the next iteration (no-op if it is already next)."""
        if (epoch, 0) != (self.epoch, self.step):
            self.epoch, self.step = int(epoch), 0
            self._close()

    def set_network_inputs(self, dtype, channels_last: bool = True) -> None:
        """Hand the network's inputs ready, made in the copy out of DALI's buffers that every
        batch gets anyway: `masked` in `dtype` (a torch dtype or its name), channels_last
        when asked, and `original_input`: a copy of `original` in that dtype and layout. `original`
        itself keeps cfg.dtype and the contiguous layout (pretraining's SSIM target)."""
        import torch

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self._network = (dtype, torch.channels_last if channels_last else torch.contiguous_format)

    def _close(self) -> None:
        self._release_copied(every=True)
        self._iterator = None  # DALI frees the pipeline (and its workers) with the iterator
        self._end_pending = False

    _MAX_IN_FLIGHT = 4

    def _hold_until_copied(self, data: dict) -> None:
        """Keep DALI's GPU tensors of a batch alive until the copies out of them, queued on
        torch's current stream, have run (an event marks that point): DALI's buffers are
        views that return to its memory pool when released, and the training step no longer
        waits for the device, so that release could otherwise come before the copy ran."""
        import torch

        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((event, data))
        self._release_copied()

    def _release_copied(self, every: bool = False) -> None:
        """Drop the held batches whose copies have run, oldest first; waits for the copies
        beyond _MAX_IN_FLIGHT batches (the device that far behind), or for all (`every`)."""
        while self._in_flight:
            event = self._in_flight[0][0]
            if every or len(self._in_flight) > self._MAX_IN_FLIGHT:
                event.synchronize()
            elif not event.query():
                break
            self._in_flight.popleft()

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        source = self._source.at(self.epoch, self.step)
        pipe = build_pipeline(source, self.cfg, self.batch_size, self.device_id,
                              self.num_threads, self.py_workers, self.prefetch)
        names = ["packed", "case_index", "z"]
        if self.with_labels:
            names.append("label")
        with _workers_ignore_ctrl_c(), _readers_user_errors():  # DALI starts the readers and
            self._iterator = DALIGenericIterator(pipe, names, auto_reset=True,  # reads batch 1
                                                 last_batch_policy=LastBatchPolicy.DROP)
        self._built_at = (self.epoch, self.step)

    def _convert(self, data: dict) -> dict:
        """DALI's tensors (reused by its iterator after a few batches) -> fresh tensors."""
        import torch

        dtype = getattr(torch, self.cfg.dtype)
        stacked = self._source.stacked
        packed = data["packed"][0] if stacked else data["packed"]
        parts = split_packed(packed)
        net_dtype, fmt = self._network or (dtype, torch.contiguous_format)
        batch = {
            "original": parts["original"].to(dtype, copy=True).contiguous(),
            "masked": parts["masked"].to(net_dtype, memory_format=fmt, copy=True),
            "mask": parts["mask"].to(torch.float32, copy=True).contiguous(),
            "case_index": data["case_index"].reshape(-1).to(torch.int64, copy=True),
            "z": data["z"].reshape(-1).to(torch.int64, copy=True),
        }
        if self._network is not None:  # the network's copy of original, made in its one copy
            batch["original_input"] = parts["original"].to(net_dtype, memory_format=fmt, copy=True)
        if self.with_labels:
            label = data["label"][0] if stacked else data["label"][:, 0]
            batch["label"] = label.to(torch.int64, copy=True)
        if packed.is_cuda:
            self._hold_until_copied(data)
        return batch

    def _next_dali(self):
        """DALI's next batch, or None at the end of the epoch (DALI then resets itself).
        next() is called directly: DALI's __iter__ would reset a partly consumed iterator."""
        try:
            with _readers_user_errors():
                return next(self._iterator)
        except StopIteration:
            return None

    def __iter__(self):
        if self._iterator is None:
            self._build()
        if self._end_pending:
            # The previous epoch's last batch was taken but the consumer stopped before DALI
            # reported the epoch's end: take that report now, so that the same pipeline
            # serves the next epoch instead of a rebuild (reader processes, prefetch).
            self._end_pending = False
            if self._next_dali() is not None:
                raise RuntimeError("DALI yielded a batch past the end of the epoch")
        # DALI continues epoch after epoch; our (epoch, step) follows it.
        n = len(self)
        while (data := self._next_dali()) is not None:
            batch = self._convert(data[0])
            self.step += 1
            if self.step >= n:  # the epoch's last batch: the position moves on with it
                self.epoch, self.step = self.epoch + 1, 0
                self._end_pending = True
            yield batch
        if self._end_pending:
            self._end_pending = False      # DALI's end of the epoch seen
        else:                              # (never expected: DALI ended the epoch early)
            self.epoch, self.step = self.epoch + 1, 0


def make_loader(store_path, cfg: PipelineConfig, batch_size: int, device: str = "cpu",
                rank: int = 0, world_size: int = 1, epoch: int = 0, step: int = 0,
                with_labels: bool = False, num_threads: int = 2, py_workers: int = 1,
                device_id: int | None = None, prefetch: int = 2,
                stacked: bool | None = None, case_ids: list[str] | None = None) -> SliceLoader:
    """The training loader (see module doc). batch_size is per rank; py_workers reader
    processes (0 = read in the main process); num_threads DALI/NumPy threads; stacked:
    one DALI sample per batch (None = whenever the store allows, see source.py);
    case_ids: only these cases (a fine-tuning fold), None = all."""
    return SliceLoader(store_path, cfg, batch_size, device, rank, world_size, epoch, step,
                       with_labels, num_threads, py_workers, device_id, prefetch, stacked,
                       case_ids)
