"""Install what is missing into the active Python environment, and nothing else.

`make demo` and `make test` call this. It is quick when everything is present: it only imports
package metadata. torch and torchvision are pinned to the pair that installs from local disk on
the project's machines; every other dependency comes from `pyproject.toml`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import pathlib
import subprocess
import sys
import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip vendors the same module
    from pip._vendor.packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PAIR = ["torch==2.14.1", "torchvision==0.29.1"]


def _missing(requirements: list[str]) -> list[str]:
    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def points_here(direct_url: str, root: pathlib.Path = ROOT) -> bool:
    """Whether an install's ``direct_url.json`` text is an editable install of ``root`` itself.

    The URL is compared whole: ``clones/a`` is not ``clones/a-2``.
    """
    try:
        info = json.loads(direct_url or "{}")
    except ValueError:
        return False
    url = str(info.get("url", "")).rstrip("/")
    editable = bool((info.get("dir_info") or {}).get("editable"))
    return editable and url == root.resolve().as_uri()


def _attncam_points_here() -> bool:
    try:
        dist = md.distribution("attncam")
    except md.PackageNotFoundError:
        return False
    return points_here(dist.read_text("direct_url.json") or "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--test", action="store_true", help="also the test-only dependencies")
    parser.add_argument(
        "--points-here",
        action="store_true",
        help="only check: exit 0 when the editable install of attncam is this clone, else 1",
    )
    args = parser.parse_args()
    if args.points_here:
        sys.exit(0 if _attncam_points_here() else 1)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    if args.test:
        wanted += project["optional-dependencies"]["test"]

    if _missing(["torch", "torchvision"]):
        _pip(*TORCH_PAIR)
    rest = [r for r in _missing(wanted) if Requirement(r).name not in ("torch", "torchvision")]
    if rest:
        _pip(*rest)
    if not _attncam_points_here():
        _pip("--no-deps", "--no-build-isolation", "-e", str(ROOT))
    print("dependencies: all present", flush=True)


if __name__ == "__main__":
    main()
