"""What a wheel ships: every package of the source tree is listed in pyproject.toml (setuptools drops the rest)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    dirs = {name: ROOT / path for name, path in setup["package-dir"].items()}
    found = set()
    for name, root in dirs.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    # Data-only packages (model configs, the web page) have no __init__.py; they exist when their folder does.
    for name in setup.get("package-data", {}):
        base = max((b for b in dirs if name == b or name.startswith(b + ".")), key=len)
        if dirs[base].joinpath(*name[len(base):].split(".")[1:]).is_dir():
            found.add(name)
    assert found - listed == set(), "packages missing from pyproject.toml's [tool.setuptools] packages"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"
