"""The Dockerfile, checked as text against the package (docker/smoke.sh builds and runs the
image where a Docker engine is at hand; see docs/docker.md).

The image is a Debian base with the CUDA libraries from PyPI's wheels, so what must agree is
inside the file: the CUDA major of the pinned torch build, DALI and CuPy, the pins against
pyproject's requirements, and the copied folders against pyproject's package layout."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Python of the Debian release a base image is built on.
DEBIAN_PYTHON = {"bookworm": (3, 11), "trixie": (3, 13)}


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(r.split(None, 1)[0].upper(), r.split(None, 1)[1] if " " in r else "") for r in rows]


def _args(ins) -> dict[str, str]:
    return {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for k, a in ins if k == "ARG" and "=" in a}


def _pip_installs(ins) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN lines, options left out."""
    runs = " && ".join(a for k, a in ins if k == "RUN")
    out = []
    for part in runs.split("&&"):
        words = shlex.split(part)
        at = next((i for i in range(len(words) - 1) if words[i].endswith("pip") and words[i + 1] == "install"), None)
        if at is not None:
            out.append([w for w in words[at + 2:] if not w.startswith("-")])
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_base_is_debian_with_a_python_the_package_accepts():
    ins = _instructions()
    base = next(a for k, a in ins if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: _args(ins)[m.group(1)], base).split()[0]
    release = next((r for r in DEBIAN_PYTHON if r in base), None)
    assert base.startswith("debian:") and release, f"base {base}: expected a Debian release image"
    major, minor = DEBIAN_PYTHON[release]
    requires = _pyproject()["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(f"{major}.{minor}"), (base, requires)
    apt = " ".join(a for k, a in ins if k == "RUN" and "apt-get install" in a)
    assert "python3-venv" in apt and "tini" in apt  # the venv and PID 1 come from Debian


def test_gpu_stack_is_pinned_for_one_cuda_major():
    ins = _instructions()
    cuda = _args(ins)["CUDA_MAJOR"]
    pins = {Requirement(w).name.lower(): Requirement(w) for cmd in _pip_installs(ins) for w in cmd if w != "."}
    dali = [n for n in pins if n.startswith("nvidia-dali-cuda")]
    cupy = [n for n in pins if n.startswith("cupy-cuda")]
    assert len(dali) == 1 and len(cupy) == 1 and "torch" in pins and "torchvision" in pins, sorted(pins)
    assert re.fullmatch(rf"nvidia-dali-cuda{cuda}\d", dali[0]), (dali[0], cuda)
    assert re.fullmatch(rf"cupy-cuda{cuda}x", cupy[0]), (cupy[0], cuda)
    # torch's CUDA is not in its PyPI name: the build checks torch.version.cuda against CUDA_MAJOR.
    check = " ".join(a for k, a in ins if k == "RUN" and "torch.version.cuda" in a)
    assert "${CUDA_MAJOR}" in check and "sys.exit" in check

    # Each pin is exact, and allowed by pyproject's own requirement of that name (so the later
    # `pip install .` keeps it); DALI and CuPy are the very packages pyproject names.
    deps = {Requirement(d).name.lower(): Requirement(d) for d in _pyproject()["project"]["dependencies"]}
    assert dali[0] in deps and cupy[0] in deps, "pyproject and the Dockerfile name different CUDA builds"
    for name, req in pins.items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req}: pin an exact release"
        if name in deps:
            assert deps[name].specifier.contains(spec.version, prereleases=True), (str(req), str(deps[name]))
    # torchvision releases pair with torch releases: 0.(minor + 15) goes with 2.minor.
    t_minor = int(next(iter(pins["torch"].specifier)).version.split(".")[1])
    tv_minor = int(next(iter(pins["torchvision"].specifier)).version.split(".")[1])
    assert tv_minor == t_minor + 15, (str(pins["torch"]), str(pins["torchvision"]))


def test_copied_folders_are_the_package():
    ins = _instructions()
    pyproject = _pyproject()
    copied = {w for k, a in ins if k == "COPY" for w in a.split()[:-1] if not w.startswith("--")}
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    for src in copied | package_dirs:
        assert (REPO / src).exists(), src
    assert package_dirs <= copied, f"not copied: {package_dirs - copied}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert ["."] in _pip_installs(ins)  # the package itself, after the copies

    # .dockerignore keeps every copied path in the build context.
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    if "*" in ignore:
        assert {f"!{src}" for src in copied} <= set(ignore), f"excluded from the context: {copied}"
    else:
        assert not copied & set(ignore)


def test_runs_as_a_user_with_a_cache_volume_and_tcsmae_as_entrypoint():
    ins = _instructions()
    users = [a for k, a in ins if k == "USER"]
    last_run = max(i for i, (k, _) in enumerate(ins) if k == "RUN")
    last_user = max(i for i, (k, _) in enumerate(ins) if k == "USER")
    assert users and users[-1] not in ("root", "0") and last_user > last_run

    env = " ".join(a for k, a in ins if k == "ENV")
    cache = re.search(r"TCSMAE_CACHE=(\S+)", env).group(1)
    volumes = [a for k, a in ins if k == "VOLUME"]
    assert any(cache in v.split() or cache in v for v in volumes), (cache, volumes)

    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry[-1] == "tcsmae", entry
    assert entry[0] == "tcsmae" or Path(entry[0]).name == "tini", entry  # exec form: signals reach tcsmae
    assert _pyproject()["project"]["scripts"]["tcsmae"] == "tcsmae.cli:main"


def test_docker_scripts_parse():  # bash runs CI (.ci/run), so it is always there
    for script in ("smoke.sh", "make-base.sh"):
        path = REPO / "docker" / script
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
