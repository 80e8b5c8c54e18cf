"""The grid's results in one place: OUT/summary.md, OUT/results.json and the figures.

An arm's DSC is, per case and per fold, the mean over the report's columns (the label map's
groups, or its classes) of the defined DSC values; its figure is the mean +- population std
over folds, as in the paper's tables. Paired tests are two-sided Wilcoxon signed-rank tests
over the cases both arms scored (scipy.stats.wilcoxon): every arm against scratch, and every
pair of arms the paper ranks, to say which of the paper's orderings hold here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

from tcsmae.ablate.figures import dsc_box_plot, k_rho_heat_map
from tcsmae.ablate.run import ArmRun
from tcsmae.atomic_files import write_json_atomic, write_text_atomic
from tcsmae.plain import to_plain


def _mean_dsc(entry: dict | None, by: str) -> float | None:
    """Mean over columns of the defined DSC values in a fold's or a case's entry."""
    values = [v.get("dsc") for v in ((entry or {}).get(by) or {}).values() if isinstance(v, dict)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_scores(results: dict, by: str) -> dict:
    """{"folds": [DSC per fold], "mean", "std" (over folds, None when < 2), "cases": {id: DSC}}."""
    if by == "groups" and not (results.get("mean") or {}).get("groups"):
        by = "classes"  # a map without groups, as `tcsmae report` does
    folds = [v for v in (_mean_dsc(f, by) for f in results.get("folds", [])) if v is not None]
    cases = {c: v for c, v in ((c, _mean_dsc(e, by)) for c, e in (results.get("cases") or {}).items())
             if v is not None}
    mean = sum(folds) / len(folds) if folds else None
    std = math.sqrt(sum((v - mean) ** 2 for v in folds) / len(folds)) if len(folds) >= 2 else None
    return {"by": by, "folds": folds, "mean": mean, "std": std, "cases": cases}


def paired_test(a: dict, b: dict) -> tuple[float | None, int]:
    """Two-sided Wilcoxon signed-rank p over the cases in both {case: DSC} maps, and their number."""
    from scipy.stats import wilcoxon

    both = sorted(set(a) & set(b))
    if not both:
        return None, 0
    diffs = [b[c] - a[c] for c in both]
    if all(d == 0 for d in diffs):
        return 1.0, len(both)
    return float(wilcoxon([a[c] for c in both], [b[c] for c in both]).pvalue), len(both)


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _p(p: float | None, n: int) -> str:
    return "n/a (n=0)" if p is None else f"{p:.3g} (n={n})"


def _arm_settings(run: ArmRun) -> dict:
    """The settings that tell arms apart, from the pretraining config."""
    if run.config is None:
        return {}
    pipe, model = run.config["pipeline"], run.config["model"]
    return {"masking": pipe["masking"], "K": pipe["intervals"], "rho": pipe["rho"],
            "mep_levels": model["mep_levels"], "mep_head": "pool" if model["projection"] == "maxpool" else "flatten",
            "branches": model["branches"], "branch_forward": model["branch_forward"],
            "contrastive": model.get("mep_levels") != [] and run.config["loss"]["weight"] > 0}


def _pretraining_steps(run: ArmRun) -> int | None:
    meta = run.pretrain_dir / "weights.json" if run.pretrain_dir else None
    if meta is None or not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("trained", {}).get("steps_done")


def orderings(runs: list[ArmRun], scores: dict[str, dict]) -> list[dict]:
    """Every pair of arms with the paper's figures: the paper's order per task, ours, the test."""
    rows = []
    with_paper = [r for r in runs if r.arm.paper]
    for a, b in itertools.combinations(with_paper, 2):
        sa, sb = scores[a.arm.name], scores[b.arm.name]
        p, n = paired_test(sa["cases"], sb["cases"])
        here = None if sa["mean"] is None or sb["mean"] is None else (sb["mean"] > sa["mean"]) - (sb["mean"] < sa["mean"])
        paper = [(pb > pa) - (pb < pa) for pa, pb in zip(a.arm.paper, b.arm.paper)]
        rows.append({"a": a.arm.name, "b": b.arm.name, "paper_pneumonia": paper[0], "paper_mediastinal": paper[1],
                     "here": here, "p": p, "n": n})
    return rows


def _order_text(a: str, b: str, sign: int | None) -> str:
    return "n/a" if sign is None else f"{b} > {a}" if sign > 0 else f"{a} > {b}" if sign < 0 else f"{a} = {b}"


def write_summary(runs: list[ArmRun], grid_name: str, settings, data: Path, labelled: Path, out: Path,
                  seconds: dict[str, float]) -> dict:
    """Write OUT/summary.md, OUT/results.json and the figures; returns the results document
    (folders in it relative to OUT)."""
    by = settings.by
    scores = {r.arm.name: arm_scores(json.loads((r.finetune_dir / "results.json").read_text()), by) for r in runs}
    base = runs[0].arm.name
    figures = [dsc_box_plot({n: s["folds"] for n, s in scores.items()}, out / "dsc_by_arm.png",
                            f"{grid_name}: fine-tuning DSC per fold")]
    cells = {}
    for r in runs:
        st = _arm_settings(r)
        if st.get("masking") == "tissue" and r.arm.objective == "tcs-mae" and scores[r.arm.name]["mean"] is not None:
            cells[(st["K"], st["rho"])] = scores[r.arm.name]["mean"]
    if len({k for k, _ in cells}) * len({rho for _, rho in cells}) > 1:
        figures.append(k_rho_heat_map(cells, out / "dsc_k_rho.png", f"{grid_name}: fine-tuning DSC by K and rho"))
    arms = []
    for r in runs:
        s = scores[r.arm.name]
        p, n = paired_test(scores[base]["cases"], s["cases"]) if r.arm.name != base else (None, 0)
        arms.append({"name": r.arm.name, "label": r.arm.label, "objective": r.arm.objective,
                     "paper_dsc": r.arm.paper, "settings": _arm_settings(r), "pretraining_steps": _pretraining_steps(r),
                     "pretrain_dir": os.path.relpath(r.pretrain_dir, out) if r.pretrain_dir else None,
                     "finetune_dir": os.path.relpath(r.finetune_dir, out), "dsc_folds": s["folds"], "dsc_mean": s["mean"],
                     "dsc_std": s["std"], "dsc_cases": s["cases"], "p_vs_scratch": p, "n_cases": n})
    pairs = orderings(runs, scores)
    doc = {"grid": grid_name, "settings": to_plain(settings), "data": str(data), "labelled": str(labelled),
           "dsc_over": scores[base]["by"], "arms": arms, "orderings": pairs,
           "figures": [f.name for f in figures], "same_folds": True, "seconds": seconds}
    write_json_atomic(out / "results.json", doc)
    write_text_atomic(out / "summary.md", summary_markdown(doc, out))
    return doc


def summary_markdown(doc: dict, out: Path) -> str:
    s = doc["settings"]
    lines = [f"# Ablation `{doc['grid']}`", "",
             (f"Written by `tcsmae ablate` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{platform.machine()}, device {s['device']}. Pretraining store `{doc['data']}`, labelled store "
              f"`{doc['labelled']}`, labels map `{s['labels_map']}`."), "",
             "Settings (every arm): " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in s.items()
                                                   if k not in ("grid", "labels_map") and v is not None) + ".", "",
             (f"Every arm is fine-tuned with the same seed ({s['seed']}) on the same patient-grouped folds "
              f"({s['folds']}; checked from each run's folds.json). An arm's DSC is the mean over the "
              f"{doc['dsc_over']} of the defined per-class values, per fold (mean ± std over folds) and per "
              "case (the pairs of the Wilcoxon signed-rank tests, two-sided)."), "",
             ("| arm | paper's row | masking | K | rho | MEP levels | head | branches | forward | pretraining steps "
              "| DSC % | Δ vs scratch | p vs scratch (n cases) | paper DSC % (pneumonia / mediastinal) |"),
             "|" + "---|" * 14]
    base_mean = doc["arms"][0]["dsc_mean"]
    for a in doc["arms"]:
        st = a["settings"]
        delta = (None if a["dsc_mean"] is None or base_mean is None or a is doc["arms"][0]
                 else a["dsc_mean"] - base_mean)
        levels = " ".join(f"F{v}" for v in st.get("mep_levels", [])) or ("none" if st else "-")
        lines.append("| " + " | ".join([
            a["name"], a["label"] or "-", st.get("masking", "-"),
            str(st.get("K", "-")) if st.get("masking") == "tissue" else "-",
            f"{st['rho']:.2f}" if st.get("masking") == "tissue" else "-", levels,
            st.get("mep_head", "-") if st.get("mep_levels") else "-", st.get("branches", "-"),
            st.get("branch_forward", "-"), str(a["pretraining_steps"] or "-"),
            _pct(a["dsc_mean"], a["dsc_std"]), "-" if delta is None else f"{100 * delta:+.2f}",
            "-" if a is doc["arms"][0] else _p(a["p_vs_scratch"], a["n_cases"]),
            " / ".join(f"{v:.2f}" for v in a["paper_dsc"]) if a["paper_dsc"] else "-"]) + " |")
    if doc["orderings"]:
        lines += ["", "## The paper's orderings here", "",
                  ("Each pair of rows with the paper's figures: the paper's order on pneumonia and on "
                   "mediastinal tumours, the order of the means here, and the paired test over cases."), "",
                  "| pair | paper, pneumonia | paper, mediastinal | here | p (n cases) |", "|---|---|---|---|---|"]
        for o in doc["orderings"]:
            lines.append(f"| {o['a']} vs {o['b']} | {_order_text(o['a'], o['b'], o['paper_pneumonia'])} | "
                         f"{_order_text(o['a'], o['b'], o['paper_mediastinal'])} | "
                         f"{_order_text(o['a'], o['b'], o['here'])} | {_p(o['p'], o['n'])} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in doc["figures"]]
    report = out / "report.md"
    if report.is_file():
        lines += ["", "## Report (`tcsmae report`, per column)", "", report.read_text().strip()]
    lines += ["", "## Folders", ""] + [(f"- {a['name']}: pretraining `{a['pretrain_dir'] or '-'}`, fine-tuning "
                                         f"`{a['finetune_dir']}`") for a in doc["arms"]]
    if doc["seconds"]:
        lines += ["", "## Wall time per step (s)", "", "| step | s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in doc["seconds"].items()]
    return "\n".join(lines) + "\n"
