"""The host-side non-finite guard, as a reference for the device-side one of train_step: read
the losses to the host every step and, when one is non-finite on any rank, do not call the
optimiser and copy the saved buffers back (used by test_step.py and test_distributed.py)."""

from __future__ import annotations

import math

import torch

from tcsmae.pretrain.step import step_inputs


def host_guard_step(setup, batch: dict, ctx) -> tuple[dict, bool]:
    """One step of `setup` (eager, no GradScaler) on `batch`; returns (loss values, finite)."""
    masked, original, target = step_inputs(batch, setup, ctx.device)
    setup.optimizer.zero_grad(set_to_none=True)
    buffers = list(setup.core.buffers())
    saved = [b.clone() for b in buffers]
    with torch.autocast(ctx.device.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
        out = setup.model(masked, original)
    terms = setup.criterion(out, target)
    terms.loss.backward()
    stats = torch.stack([terms.loss.detach(), terms.loss_ssim.detach(), terms.loss_con.detach()])
    if ctx.distributed:
        torch.distributed.all_reduce(stats)
        stats /= ctx.world_size
    loss, loss_ssim, loss_con = stats.tolist()
    finite = all(math.isfinite(v) for v in (loss, loss_ssim, loss_con))
    if finite:
        setup.optimizer.step()
        if setup.core.temperature is not None:
            setup.core.temperature.clamp_()
    else:
        with torch.no_grad():
            torch._foreach_copy_(buffers, saved)
    t = out.temperature
    return {"loss": loss, "loss_ssim": loss_ssim, "loss_con": loss_con,
            "temperature": None if t is None else float(t.detach())}, finite


def same_state(a, b) -> bool:
    """Bit-equal model state dicts and optimiser states of two TrainingSetups."""
    sa, sb = a.core.state_dict(), b.core.state_dict()
    if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
        return False
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    return oa.keys() == ob.keys() and all(
        torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
