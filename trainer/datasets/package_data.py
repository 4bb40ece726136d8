"""Raw data files shipped inside a Python package, located without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_data_dir(package: str, subdir: str, files: list[str]) -> Path | None:
    """``<package dir>/<subdir>`` when it holds every one of ``files``, else None.

    ``importlib.util.find_spec`` on a top-level name only locates the package: its
    ``__init__`` never runs, so the package's own (old or heavy) dependencies are not needed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / subdir
        if all((d / name).is_file() for name in files):
            return d
    return None
