"""Guard rails of the layout: which package may import which, and how long a function may be.

The dependency rules (docs/ARCHITECTURE.md): ``stages`` use everything; ``explain``, ``metrics``,
``models``, ``data`` and ``viz`` never import ``stages``; ``metrics`` never imports ``explain``;
``explain`` never imports ``metrics`` or ``data``. ``io`` and ``runtime`` import no other
attncam module and ``inference`` only ``runtime``, so any package may use them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "attncam"

FORBIDDEN: dict[str, set[str]] = {
    "explain": {"stages", "metrics", "data"},
    "metrics": {"stages", "explain"},
    "models": {"stages", "explain", "metrics"},
    "data": {"stages", "explain", "metrics"},
    "viz": {"stages", "explain", "metrics", "models", "data"},
    "io": {"stages", "explain", "metrics", "models", "data", "viz", "runtime", "inference"},
    "inference": {"stages", "explain", "metrics", "models", "data", "viz", "io"},
    "runtime": {"stages", "explain", "metrics", "models", "data", "viz", "io", "inference"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level attncam packages imported by a file (also inside functions), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "attncam":
                names = [f"attncam.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "attncam" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def _edges() -> list[tuple[str, str, str]]:
    """``(file, from package, to package)`` for every attncam import in src/."""
    rows = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        for target, line in _imported_packages(path):
            rows.append((f"{path.relative_to(SRC)}:{line}", pkg, target))
    return rows


def test_import_edges_follow_the_dependency_rules() -> None:
    bad = [
        f"{where} ({src} -> {dst})"
        for where, src, dst in _edges()
        if dst in FORBIDDEN.get(src, set())
    ]
    assert not bad, "imports against the dependency rules:\n" + "\n".join(bad)


def test_the_checker_sees_a_forbidden_edge(tmp_path: Path) -> None:
    """The rule check is not vacuous: a metrics file importing the explain engine is caught."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from attncam.explain.hooks import capture\n")
    assert ("explain", 2) in _imported_packages(fake)


def test_every_package_is_covered_by_a_rule() -> None:
    packages = {_package(p) for p in SRC.rglob("*.py")} - {"__init__", "stages"}
    assert packages <= set(FORBIDDEN), (
        f"packages without a dependency rule: {packages - set(FORBIDDEN)}"
    )


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (f"{path.relative_to(SRC)}:{n.lineno} {n.name}", n.end_lineno - n.lineno + 1)  # type: ignore[operator]
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


@pytest.mark.parametrize("limit", [80])
def test_no_function_in_src_is_over_80_lines(limit: int) -> None:
    long = [
        f"{name} ({n} lines)" for p in SRC.rglob("*.py") for name, n in _functions(p) if n > limit
    ]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_explain_stage_stays_thin() -> None:
    stage = SRC / "stages" / "explain.py"
    assert len(stage.read_text().splitlines()) < 300
    module = (SRC / "stages" / "explain_module.py").read_text()
    step = module[module.index("def test_step") : module.index("def _count_skipped_channels")]
    from attncam.metrics import METRIC_KEYS

    named = [k for k in METRIC_KEYS if k in step]
    assert not named, (
        f"the explain test step names metrics {named}: dispatch belongs to MetricSuite"
    )


def test_ruff_rules_hold_in_src() -> None:
    """Lint, complexity (C901 <= 12), private access across modules (SLF001) and prints (T20)."""
    import subprocess
    import sys

    root = SRC.parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
