"""Issue 15, item 11: ``make`` and the entry points import this clone's ``src``, not another's.

A second clone in a shared environment must not run the first clone's code: the Makefile puts
its own ``src`` first on ``PYTHONPATH`` (and re-points an editable install that points at
another clone), and ``train.py`` / ``explain.py`` put their clone's ``src`` first themselves.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT


@pytest.fixture
def other_clone(tmp_path: Path) -> Path:
    """The ``src`` of another clone whose ``attncam`` fails loudly when imported."""
    pkg = tmp_path / "other" / "src" / "attncam"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('imported the other clone')\n")
    return pkg.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_imports_this_clones_src(other_clone: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(other_clone), "PYTHON": sys.executable}
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "where"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "src" / "attncam" / "__init__.py"


def test_the_entry_points_import_their_own_clone(other_clone: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(other_clone), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "explain.py"), "limit=-1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "imported the other clone" not in proc.stderr
    assert proc.returncode == 2 and "error: invalid limit=-1" in proc.stderr, proc.stderr[-2000:]


def _ensure_deps() -> object:
    spec = importlib.util.spec_from_file_location("ensure_deps", ROOT / "scripts/ensure_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_editable_install_of_another_clone_is_not_taken_for_this_one(tmp_path: Path) -> None:
    deps = _ensure_deps()
    here = tmp_path / "main"
    here.mkdir()
    url = here.resolve().as_uri()

    def info(u: str, editable: bool = True) -> str:
        return f'{{"url": "{u}", "dir_info": {{"editable": {str(editable).lower()}}}}}'

    assert deps.points_here(info(url), here)  # type: ignore[attr-defined]
    assert not deps.points_here(info(url + "-2"), here)  # a clone beside it  # type: ignore[attr-defined]
    assert not deps.points_here(info(url, editable=False), here)  # type: ignore[attr-defined]
    assert not deps.points_here("", here)  # type: ignore[attr-defined]
