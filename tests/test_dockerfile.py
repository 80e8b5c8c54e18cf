"""The Dockerfile installs this package with the DALI and CuPy builds pyproject names for
the base image's CUDA version (no Docker engine runs here, so the file is checked as text)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(r.split(None, 1)[0].upper(), r.split(None, 1)[1] if " " in r else "") for r in rows]


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip().strip('"').strip("'"), maxsplit=1)[0].lower()


def test_dockerfile_matches_the_package():
    ins = _instructions()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {_requirement_name(d): d for d in pyproject["project"]["dependencies"]}

    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = next(a for k, a in ins if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("pytorch/pytorch:") and base.endswith("-runtime"), base
    major, minor = re.search(r"cuda(\d+)\.(\d+)", base).groups()

    dali = f"nvidia-dali-cuda{major}{minor}"
    cupy = f"cupy-cuda{major}x"
    assert dali in deps and cupy in deps, f"pyproject must list {dali} and {cupy} for the image's CUDA"

    runs = " && ".join(a for k, a in ins if k == "RUN")
    installs = [shlex.split(part) for part in runs.split("&&") if "pip install" in part]
    names = {_requirement_name(tok) for cmd in installs for tok in cmd[cmd.index("install") + 1:]
             if not tok.startswith("-")}
    assert {dali, cupy, "."} <= names  # the same wheels, then this package itself

    copied = {a.split()[0] for k, a in ins if k == "COPY"}
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    for src in copied | package_dirs:
        assert (REPO / src).exists(), src
    assert package_dirs <= copied and "pyproject.toml" in copied

    entry = next(a for k, a in ins if k == "ENTRYPOINT")
    assert entry == '["tcsmae"]'
    assert pyproject["project"]["scripts"]["tcsmae"] == "tcsmae.cli:main"
