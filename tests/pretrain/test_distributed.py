"""Two CPU processes with gloo: negatives come from the global batch, DDP training runs, a
stop signal and a non-finite loss on one rank act on both.

One spawn serves both checks (process start-up dominates the cost)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket

import torch
import torch.multiprocessing as mp

from tcsmae.pretrain.losses import nt_xent

N, D, IN = 6, 8, 5  # global batch, embedding size, input features


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, IN, generator=g), torch.randn(N, IN, generator=g), torch.randn(D, IN, generator=g)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dataclasses import replace

    from tcsmae.distributed import init_distributed, shutdown
    from tcsmae.pretrain.batches import SyntheticBatches
    from tcsmae.pretrain.config import preset
    from tcsmae.pretrain.engine import pretrain
    from tcsmae.pretrain.losses import global_nt_xent

    ctx = init_distributed("cpu")
    # 1) global-batch NT-Xent through a DDP-wrapped projector
    x_m, x_o, w = _data()
    proj = torch.nn.Linear(IN, D, bias=False)
    with torch.no_grad():
        proj.weight.copy_(w)
    ddp = torch.nn.parallel.DistributedDataParallel(proj)
    n = N // world
    mine = slice(rank * n, (rank + 1) * n)
    z = ddp(torch.cat([x_m[mine], x_o[mine]]))
    loss = global_nt_xent(z[:n], z[n:], 0.2)
    loss.backward()
    result = {"loss": loss.item(), "grad": proj.weight.grad.tolist()}
    # 2) two DDP training steps of the real engine on rank-specific synthetic batches
    cfg = preset("demo")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, size=64), batch_size=2, epochs=1, steps_per_epoch=2,
                  checkpoint_every=0, image_every=0)
    source = SyntheticBatches(2, 64, steps_per_epoch=2, seed=0, rank=rank)
    pos = pretrain(cfg, source, os.path.join(out_dir, "run"), ctx)
    result["history"] = pos.history
    # 3) a SIGTERM that reaches rank 1 only stops both ranks after the same step, saved
    from tcsmae.stopping import TrainingStopped

    class SignalRankOne(SyntheticBatches):
        def __call__(self, epoch, start_step):
            for i, batch in enumerate(super().__call__(epoch, start_step)):
                if rank == 1 and start_step + i == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    try:
        pretrain(replace(cfg, steps_per_epoch=3), SignalRankOne(2, 64, steps_per_epoch=3, seed=0, rank=rank),
                 os.path.join(out_dir, "stop"), ctx)
        result["stopped"] = None
    except TrainingStopped as stopped:
        result["stopped"] = [stopped.signum, stopped.step]
    # 4) a NaN in rank 1's batch only: the device-side guard skips that step on both ranks,
    # as the host-side guard (losses read every step) does, with the same values and state
    from host_guard import host_guard_step, same_state

    from tcsmae.pretrain.step import build_training, read_steps, train_step

    class NanOnRankOne(SyntheticBatches):
        def batch(self, epoch, step):
            b = super().batch(epoch, step)
            if rank == 1 and step == 1:
                b["original"] = b["original"].clone()
                b["original"][0, 0, 0, 0] = float("nan")
            return b

    guard_cfg = replace(cfg, steps_per_epoch=3)
    source = NanOnRankOne(2, 64, steps_per_epoch=3, seed=0, rank=rank)
    device = build_training(guard_cfg, ctx)
    rows = read_steps([train_step(device, source.batch(0, i), ctx) for i in range(3)])
    host = build_training(guard_cfg, ctx)
    reference = [host_guard_step(host, source.batch(0, i), ctx) for i in range(3)]
    result["guard"] = {"device": [r.finite for r in rows], "host": [f for _, f in reference],
                       "same_losses": all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(
                           [r.values["loss"] for r in rows], [v["loss"] for v, _ in reference])),
                       "same_state": same_state(device, host),
                       "weights": float(sum(p.double().sum() for p in device.core.parameters()))}
    shutdown(ctx)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_global_negatives_and_training(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    x_m, x_o, w = _data()
    proj = torch.nn.Linear(IN, D, bias=False)
    with torch.no_grad():
        proj.weight.copy_(w)
    full = nt_xent(proj(x_m), proj(x_o), 0.2)  # one process, the whole batch of N
    full.backward()
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert abs(mean_loss - full.item()) < 1e-5
    for r in ranks:  # DDP-averaged gradients equal the single-process global-batch gradient
        torch.testing.assert_close(torch.tensor(r["grad"]), proj.weight.grad, atol=1e-6, rtol=1e-5)
    # and per-rank (local-negative) losses would differ: the gather matters
    with torch.no_grad():
        local = [nt_xent(proj(x_m[s]), proj(x_o[s]), 0.2).item() for s in (slice(0, 3), slice(3, 6))]
    assert abs(sum(local) / 2 - full.item()) > 1e-3

    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert len(h0) == len(h1) == 2
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1]  # logged losses are averaged over ranks
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 only writes
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == [signal.SIGTERM, 2]
    stop_ckpt = torch.load(tmp_path / "stop" / "checkpoints" / "last.pt", weights_only=True)
    assert stop_ckpt["step"] == 2 and stop_ckpt["data_position"] == {"epoch": 0, "step": 2}
    for r in ranks:  # the NaN of rank 1 skipped step 2 on both ranks, as the host guard did
        assert r["guard"]["device"] == r["guard"]["host"] == [True, False, True]
        assert r["guard"]["same_losses"] and r["guard"]["same_state"]
    assert ranks[0]["guard"]["weights"] == ranks[1]["guard"]["weights"]
