"""Running a grid: per arm, pretrain -> export -> fine-tune, each step a `tcsmae` subcommand
called in-process (so the numbers come from exactly what users run), then `tcsmae report`.

Resumable: a step whose output is complete is skipped (weights.pt with weights.json beside
it; a results.json marked complete); an interrupted pretraining continues from its
checkpoints/last.pt (`pretrain --resume`), an interrupted fine-tuning from its folds'
checkpoints (the same `finetune` command again). Layout under OUT:

    pretrain/<arm>-<digest>/   the run folder (config.json, metrics.jsonl, checkpoints/),
                               request.json (the config asked for), weights.pt + weights.json
    finetune/<arm>-<digest>/   the `tcsmae finetune --out` folder
    report.md, summary.md, results.json, figures (tcsmae.ablate.summary), timings.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tcsmae.ablate.grid import (
    AblateConfig,
    Arm,
    Grid,
    finetune_key,
    pretrain_key,
    train_config,
)
from tcsmae.atomic_files import write_json_atomic
from tcsmae.cli import main as tcsmae_main
from tcsmae.errors import UserError
from tcsmae.plain import to_plain


class StepFailed(UserError):
    """A subcommand of the grid returned a non-zero exit code (its own message is printed)."""

    def __init__(self, title: str, code: int):
        what = "was interrupted" if code in (130, 143) else f"failed with exit code {code}"
        super().__init__(f"step '{title}' {what}; finished steps are kept: run the same `tcsmae ablate` "
                         "command again to resume", exit_code=code)


@dataclass
class ArmRun:
    """Where one arm's outputs lie once its steps are done."""

    arm: Arm
    finetune_dir: Path
    pretrain_dir: Path | None = None
    config: dict | None = None  # the pretraining config (plain), None for scratch


class Steps:
    """Runs `tcsmae` subcommands in-process and keeps their wall times in OUT/timings.json."""

    def __init__(self, out: Path, say: Callable[[str], None] = print, runner: Callable[[list[str]], int] | None = None):
        self.path = out / "timings.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.say = say
        self.runner = runner or tcsmae_main

    def __call__(self, title: str, argv: list[str]) -> None:
        self.say(f"\n=== {title}: tcsmae {' '.join(argv)}")
        t0 = time.perf_counter()
        code = self.runner(argv)
        if code != 0:
            raise StepFailed(title, code)
        self.seconds[title] = self.seconds.get(title, 0.0) + time.perf_counter() - t0
        write_json_atomic(self.path, self.seconds)


def complete_results(results: Path) -> bool:
    """A fine-tuning folder's results.json exists and says all its folds are done."""
    try:
        return bool(json.loads(results.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def pretrained_weights(arm: Arm, settings: AblateConfig, data: Path, out: Path, steps: Steps) -> ArmRun:
    """Pretrain (or resume) and export the arm; returns its run with the weights in place."""
    cfg = train_config(arm, settings)
    run_dir = out / "pretrain" / pretrain_key(arm, cfg, data)
    weights = run_dir / "weights.pt"
    plain = to_plain(cfg)
    done = weights.is_file() and weights.with_suffix(".json").is_file()
    last = run_dir / "checkpoints" / "last.pt"
    if done:
        steps.say(f"=== pretrain {arm.name}: done ({weights})")
    else:
        if last.is_file():
            argv = ["pretrain", "--resume", str(last), "--data", str(data), "--out", str(run_dir),
                    "--epochs", str(cfg.epochs), "--device", cfg.device, "--workers", str(cfg.workers)]
        else:
            request = run_dir / "request.json"
            write_json_atomic(request, plain, indent=2)
            argv = ["pretrain", "--config", str(request), "--data", str(data), "--out", str(run_dir)]
        steps(f"pretrain {arm.name}", argv)
        steps(f"export {arm.name}", ["export", str(last), "-o", str(weights)])
    return ArmRun(arm, Path(), run_dir, plain)


def finetuned(run: ArmRun, settings: AblateConfig, labelled: Path, out: Path, steps: Steps) -> ArmRun:
    """Fine-tune the arm (or resume its folds) unless its results are complete."""
    arm = run.arm
    key = finetune_key(arm, run.pretrain_dir.name if run.pretrain_dir else None, settings, labelled)
    run.finetune_dir = out / "finetune" / key
    if complete_results(run.finetune_dir / "results.json"):
        steps.say(f"=== finetune {arm.name}: done ({run.finetune_dir})")
        return run
    init = str(run.pretrain_dir / "weights.pt") if run.pretrain_dir else "scratch"
    argv = ["finetune", "--data", str(labelled), "--out", str(run.finetune_dir), "--init", init,
            "--folds", str(settings.folds), "--epochs", str(settings.epochs), "--lr", repr(settings.lr),
            "--batch-size", str(settings.batch_size), "--size", str(settings.size), "--seed", str(settings.seed),
            "--device", settings.device, "--workers", str(settings.workers)]
    if not run.pretrain_dir:
        argv += ["--encoder", settings.encoder]
    if settings.labels_map:
        argv += ["--labels-map", settings.labels_map]
    if settings.allow_overlap:
        argv += ["--allow-overlap"]
    steps(f"finetune {arm.name}", argv)
    return run


def check_same_folds(runs: list[ArmRun]) -> None:
    """Every arm was scored on the same patient-grouped folds (folds.json of each run)."""
    first = None
    for run in runs:
        folds = json.loads((run.finetune_dir / "folds.json").read_text()).get("folds")
        if first is None:
            first = (run.arm.name, folds)
        elif folds != first[1]:
            raise UserError(f"arms {first[0]} and {run.arm.name} were fine-tuned on different folds "
                            f"({run.finetune_dir / 'folds.json'}): the labelled store changed; use a new --out")


def run_grid(grid: Grid, settings: AblateConfig, data: str | Path, labelled: str | Path, out: str | Path,
             say: Callable[[str], None] = print, runner: Callable[[list[str]], int] | None = None) -> list[ArmRun]:
    """Run every arm of `grid` (resuming what is there), then `tcsmae report` to OUT/report.md.

    data: the pretraining store; labelled: the labelled store. runner: the subcommand entry
    (tcsmae.cli.main; tests pass a wrapper). Returns the arms' runs, scratch first.
    """
    data, labelled, out = Path(data), Path(labelled), Path(out)
    for what, path in (("--data", data), ("--labelled", labelled)):
        if not path.exists():
            raise UserError(f"{what} {path} does not exist: convert the data first (tcsmae convert ... -o {path})")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "grid.json", {"grid": grid.name, "arms": to_plain(grid.arms), "settings": to_plain(settings),
                                          "data": str(data.resolve()), "labelled": str(labelled.resolve())})
    steps = Steps(out, say, runner)
    runs = []
    for arm in grid.arms:
        run = pretrained_weights(arm, settings, data, out, steps) if arm.pretrained else ArmRun(arm, Path())
        runs.append(finetuned(run, settings, labelled, out, steps))
    check_same_folds(runs)
    steps("report", ["report", *(str(r.finetune_dir) for r in runs), "--names", *(r.arm.name for r in runs),
                     "--by", settings.by, "-o", str(out / "report.md")])
    return runs
