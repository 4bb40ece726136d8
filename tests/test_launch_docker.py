"""The Dockerfile installs exactly the pinned stack: from the same requirement files as
`make install`, which agree with pyproject.toml; plus the image's user, ports, entrypoint
and build context. (No container engine here: checked statically.)"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from launch.components import DEFAULT_IMAGE, DEFAULT_METRICS_PORT, DEFAULT_RDZV_PORT
from launch.pins import installed_mismatches, normalize, pyproject_pins, requirement_pins

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions()


def test_requirement_files_agree_with_pyproject() -> None:
    project = pyproject_pins(str(ROOT / "pyproject.toml"))
    files = {name: requirement_pins(str(REQ / name)) for name in
             ("base.txt", "test.txt", "torchrec-cpu.txt", "torchrec-gpu.txt")}
    for name, pins in files.items():
        for pkg, version in pins.items():
            if pkg in project:
                assert version == project[pkg], f"{name}: {pkg}=={version}, pyproject pins {project[pkg]}"
    # every pyproject pin is in a requirement file the image or `make install` uses
    installed = files["base.txt"] | files["test.txt"]
    assert set(project) <= set(installed), set(project) - set(installed)
    # the GPU and CPU stacks are the same versions (fbgemm-gpu vs fbgemm-gpu-cpu)
    cpu, gpu = files["torchrec-cpu.txt"], files["torchrec-gpu.txt"]
    assert cpu["torchrec"] == gpu["torchrec"]
    assert cpu["fbgemm-gpu-cpu"] == gpu["fbgemm-gpu"]
    assert "torch" in files["base.txt"] and files["base.txt"]["torch"] == project["torch"]


def test_dockerfile_installs_from_the_pinned_files(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(a for k, a in dockerfile if k == "RUN")
    copies = " ".join(a for k, a in dockerfile if k == "COPY")
    for name in ("base.txt", "torchrec-cpu.txt", "torchrec-gpu.txt"):
        assert f"requirements/{name}" in copies
    assert re.search(r"pip install [^;]*-r requirements/base\.txt", runs)
    assert re.search(r'pip install --no-deps -r "?requirements/torchrec-\$\{VARIANT\}\.txt', runs)
    assert re.search(r"pip install --no-deps \.", runs)
    # the build fails unless the installed versions are the pinned ones
    assert re.search(r'python -m launch\.pins requirements/base\.txt "?requirements/torchrec-\$\{VARIANT\}\.txt', runs)
    args = _args(dockerfile)
    assert args["VARIANT"] == "gpu"
    assert "cpu)" in runs and "gpu)" in runs
    assert "download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"]


def test_dockerfile_has_no_version_of_its_own() -> None:
    """Any `pkg==version` written in the Dockerfile (comments included) equals the pin."""
    pins = requirement_pins(*(str(p) for p in REQ.glob("*.txt")))
    text = (ROOT / "Dockerfile").read_text()
    for pkg, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"';]*)", text):
        assert pins.get(normalize(pkg)) == version, f"Dockerfile says {pkg}=={version}, pinned {pins.get(normalize(pkg))}"


def test_python_version_matches_requires_python(dockerfile: list[tuple[str, str]]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12"
    assert _args(dockerfile)["PYTHON_VERSION"] == "3.11"
    (base,) = [a for k, a in dockerfile if k == "FROM"]
    assert base.startswith("python:${PYTHON_VERSION}")


def test_image_user_ports_entrypoint_and_sources(dockerfile: list[tuple[str, str]]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    users = [a for k, a in dockerfile if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    ports = {int(p) for k, a in dockerfile if k == "EXPOSE" for p in a.split()}
    assert {DEFAULT_METRICS_PORT, DEFAULT_RDZV_PORT} <= ports
    (entry,) = [a for k, a in dockerfile if k == "ENTRYPOINT"]
    assert entry == '["recbalance"]' and "recbalance" in project["project"]["scripts"]
    copied = " ".join(a for k, a in dockerfile if k == "COPY")
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"{pattern.rstrip('*')}/" in copied          # every package of the wheel
    # the image tag the launchers use carries the package version
    assert DEFAULT_IMAGE == f"recbalance:{project['project']['version']}"


def test_dockerignore_keeps_context_small_but_complete(dockerfile: list[tuple[str, str]]) -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "data", "runs", ".git"} <= ignored
    for k, a in dockerfile:
        if k == "COPY":
            for src in a.split()[:-1]:
                if not src.startswith("--"):
                    top = src.split("/")[0]
                    assert top not in ignored, f"COPY {src} but .dockerignore excludes {top}"
                    assert (ROOT / src).exists(), src


def test_this_environment_has_the_pinned_cpu_stack() -> None:
    """The check the image build runs (`python -m launch.pins`) passes on this venv."""
    assert installed_mismatches(requirement_pins(str(REQ / "base.txt"), str(REQ / "torchrec-cpu.txt"))) == []
    (problem,) = installed_mismatches({"torch": "0.0.1"})
    assert problem.startswith("torch: installed 2.13.0") and problem.endswith("pinned 0.0.1")
