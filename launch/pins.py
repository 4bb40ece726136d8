"""The pinned package versions, read from the requirement files and pyproject.toml.

The container build runs ``python -m launch.pins requirements/base.txt
requirements/torchrec-gpu.txt`` after installing, so an image whose torch, fbgemm or
torchrec differs from the pins fails to build; the tests use the same parsing to check
that the requirement files agree with pyproject.toml.
"""
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Iterable, List

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalization (``Fbgemm_GPU.cpu`` -> ``fbgemm-gpu-cpu``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: Iterable[str]) -> Dict[str, str]:
    """``name==version`` lines (comments and other lines ignored) as {normalized name: version}."""
    pins: Dict[str, str] = {}
    for line in lines:
        match = _PIN.match(line.split("#", 1)[0])
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def requirement_pins(*paths: str) -> Dict[str, str]:
    pins: Dict[str, str] = {}
    for path in paths:
        pins.update(parse_pins(Path(path).read_text().splitlines()))
    return pins


def pyproject_pins(path: str = "pyproject.toml") -> Dict[str, str]:
    """Pins of the project's dependencies and optional dependencies."""
    project = tomllib.loads(Path(path).read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return parse_pins(lines)


def installed_mismatches(pins: Dict[str, str]) -> List[str]:
    """Packages whose installed version (local label such as ``+cpu`` ignored) is not the pin."""
    problems = []
    for name, pinned in sorted(pins.items()):
        try:
            got = version(name).split("+", 1)[0]
        except PackageNotFoundError:
            problems.append(f"{name}: not installed, pinned {pinned}")
            continue
        if got != pinned:
            problems.append(f"{name}: installed {got}, pinned {pinned}")
    return problems


def main(argv: List[str]) -> int:
    if not argv:
        print("usage: python -m launch.pins REQUIREMENTS.txt ...", file=sys.stderr)
        return 2
    pins = requirement_pins(*argv)
    problems = installed_mismatches(pins)
    for problem in problems:
        print(f"launch.pins: {problem}", file=sys.stderr)
    if not problems:
        print("pinned versions installed: " + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
