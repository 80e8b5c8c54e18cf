"""`tcsmae report DIR [DIR ...]`: fine-tuning results as a Markdown table like Tables II/III.

Each DIR is a `tcsmae finetune --out` folder holding results.json. Cells are mean +- std
over folds of DSC (%) and HD95 (mm) per group or class, over the folds where the value is
defined; a second table gives paired Wilcoxon signed-rank tests of every run against the
first, over per-case values. Cell rules, footnotes and the tests: docs/finetune.md, "Report".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tcsmae.atomic_files import write_text_atomic
from tcsmae.errors import UserError

HELP = "Markdown table of fine-tuning runs (mean +- std over folds) with Wilcoxon tests vs the first"

CHEST11_NOTE = (
    "Note: our chest map (`chest11`) has 11 classes, not the 16 of the paper's Table III: "
    "today's TotalSegmentator (v2) labels have one `heart` label instead of four chambers and "
    "no pulmonary artery, so `heart` is one class and `tubular` holds only esophagus and "
    "trachea. Compare with Table III with that in mind.")
OVERLAP_MARK = "†"
OVERLAP_NOTE = (f"{OVERLAP_MARK} fine-tuned with --allow-overlap: some of its cases may have been "
                "seen in pretraining, so its figures can be optimistic.")
PAPER_GROUPS = {"tubular", "left lung", "right lung", "heart", "bones"}
METRICS = (("dsc", "DSC (%)", 100.0), ("hd95_mm", "HD95 (mm)", 1.0))


@dataclass(frozen=True)
class Run:
    """One fine-tuning run as read from DIR/results.json."""

    name: str
    """Row label."""
    path: Path
    """The results.json it came from."""
    results: dict
    """The parsed results.json."""

    @property
    def label_map(self) -> dict:
        return self.results.get("label_map", {})


def load_run(directory: str | Path, name: str | None = None) -> Run:
    """Read DIR/results.json (or a results.json path); UserError if missing or malformed."""
    path = Path(directory)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no results.json; give the --out folder of a finished "
                        "`tcsmae finetune` run")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-run `tcsmae finetune` to rewrite it") from None
    for key in ("folds", "mean", "std"):
        if key not in results:
            raise UserError(f"{path}: key {key!r} missing; this is not a tcsmae finetune results file")
    return Run(name=name or path.parent.name, path=path, results=results)


def _folds_text(n: int) -> str:
    return f"{n} fold{'s' if n != 1 else ''}"


def _cell(mean: float | None, std: float | None, scale: float, n_defined: int, n_folds: int) -> str:
    """'81.00 ± 2.00', '81.00 (1 fold)' or 'n/a'.

    n_defined: folds whose value is defined (the mean is over those); n_folds: the run's
    folds. No std with fewer than 2 defined values (older results.json hold 0.0 there).
    """
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.2f}"
    if std is not None and n_defined >= 2:
        text += f" ± {std * scale:.2f}"
    if n_defined != n_folds:
        text += f" ({_folds_text(n_defined)})"
    return text


def defined_folds(run: Run, by: str, column: str, metric: str) -> int:
    """How many of the run's folds have a defined value of `metric` in `column`."""
    return sum(1 for f in run.results["folds"] if (f.get(by, {}).get(column) or {}).get(metric) is not None)


def columns_of(runs: list[Run], by: str) -> list[str]:
    """Column names shared by every run (in the first run's order); UserError if none."""
    first = list(runs[0].results["mean"].get(by, {}))
    if not first:
        raise UserError(f"{runs[0].path}: no {by} in the results; try --by "
                        f"{'classes' if by == 'groups' else 'groups'}")
    for run in runs[1:]:
        theirs = list(run.results["mean"].get(by, {}))
        if theirs != first:
            raise UserError(f"{run.path} has {by} {theirs}, but {runs[0].path} has {first}; "
                            "compare runs fine-tuned with the same --labels-map")
    return first


def paired_wilcoxon(a: dict, b: dict, kind: str, column: str, metric: str) -> tuple[float | None, int]:
    """Two-sided Wilcoxon signed-rank p-value over cases scored in both runs.

    a, b: results["cases"] of two runs (case id -> {"classes"/"groups": {name: {metric: v}}}).
    Returns (p or None when it cannot be computed, number of paired cases used).
    """
    from scipy.stats import wilcoxon

    pairs = []
    for case_id in sorted(set(a) & set(b)):
        va = a[case_id].get(kind, {}).get(column, {}).get(metric)
        vb = b[case_id].get(kind, {}).get(column, {}).get(metric)
        if va is not None and vb is not None:
            pairs.append((va, vb))
    n = len(pairs)
    if n == 0:
        return None, 0
    diffs = [x - y for x, y in pairs]
    if all(d == 0 for d in diffs):
        return 1.0, n  # identical values: no evidence of a difference
    return float(wilcoxon([x for x, _ in pairs], [y for _, y in pairs]).pvalue), n


def _overlap(run: Run) -> bool:
    """Fine-tuned with --allow-overlap (results.json `config.allow_overlap`)."""
    return bool((run.results.get("config") or {}).get("allow_overlap"))


def format_report(runs: list[Run], by: str = "groups") -> str:
    """The Markdown report: results table, paired-test table, notes."""
    if not runs:
        raise UserError("give at least one fine-tuning output folder")
    if by == "groups" and not runs[0].results["mean"].get("groups"):
        by = "classes"  # a map without groups: report its classes
    cols = columns_of(runs, by)
    lines = [f"Fine-tuning results ({by}; mean ± std over folds)", ""]
    header = ["Run"] + [f"{c} {label}" for c in cols for _, label, _ in METRICS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    undefined = []
    partial = False
    for run in runs:
        cells = [run.name]
        n_folds = len(run.results["folds"])
        for c in cols:
            m, s = run.results["mean"][by][c], run.results["std"][by][c]
            for key, _, scale in METRICS:
                n_defined = defined_folds(run, by, c, key)
                partial |= m.get(key) is not None and n_defined != n_folds
                cells.append(_cell(m.get(key), s.get(key), scale, n_defined, n_folds))
            counts = m.get("n_undefined") or {}
            if isinstance(counts, dict) and any(counts.values()):
                undefined.append(f"{run.name} / {c}: undefined " + ", ".join(
                    f"{k} in {v} case(s)" for k, v in counts.items() if v))
        cells[0] = f"{run.name} ({_folds_text(n_folds)})" + (f" {OVERLAP_MARK}" if _overlap(run) else "")
        lines.append("| " + " | ".join(cells) + " |")
    if len(runs) > 1:
        base = runs[0]
        lines += ["", f"Wilcoxon signed-rank test vs {base.name} (two-sided, paired over cases): "
                      "p (n cases)", ""]
        lines.append("| Run | " + " | ".join(f"{c} {label}" for c in cols for _, label, _ in METRICS) + " |")
        lines.append("|" + "---|" * (1 + len(cols) * len(METRICS)))
        for run in runs[1:]:
            cells = [run.name]
            for c in cols:
                for key, _, _ in METRICS:
                    p, n = paired_wilcoxon(base.results.get("cases", {}), run.results.get("cases", {}),
                                           by, c, key)
                    cells.append("n/a (n=0)" if p is None else f"{p:.3g} (n={n})")
            lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if partial:
        notes.append("A cell marked (k fold(s)) is the mean over only the k folds where that value "
                     "is defined; with 1 fold there is no std.")
    if any(_overlap(r) for r in runs):
        notes.append(OVERLAP_NOTE)
    if undefined:
        notes.append("Undefined values (empty reference for DSC; empty prediction or reference "
                     "for HD95) are left out of the means: " + "; ".join(undefined) + ".")
    if any(r.label_map.get("name") == "chest11" or PAPER_GROUPS <= set(r.results["mean"].get("groups", {}))
           for r in runs):
        notes.append(CHEST11_NOTE)
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="fine-tuning output folders "
                        "(results.json inside); the first is the baseline of the paired tests")
    parser.add_argument("--by", choices=("groups", "classes"), default="groups",
                        help="columns: the label map's report groups (default; classes when it "
                             "has none) or its classes")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="row names, one per DIR (default: the folder names)")
    parser.add_argument("-o", "--out", type=Path, help="also write the Markdown to this file")


def run(args) -> int:
    names = args.names or [None] * len(args.dirs)
    if len(names) != len(args.dirs):
        raise UserError(f"--names gives {len(names)} names for {len(args.dirs)} folders; give one per folder")
    runs = [load_run(d, n) for d, n in zip(args.dirs, names)]
    text = format_report(runs, args.by)
    print(text, end="")
    if args.out:
        write_text_atomic(args.out, text)
    return 0
