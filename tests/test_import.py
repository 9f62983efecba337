"""``import cola, cola_curvature`` works from every directory a user or notebook starts in.

CoLA's ``cola/linalg/__init__.py`` imports its subpackages (``inverse``, ``eig``, ``logdet``,
``trace``, ``unary``, ...) by top-level name, so a folder or module of that name on
``sys.path`` breaks ``import cola``; these runs guard against the repo growing one. (The
rules live in ``dispatch_rules/{inv,eig,logdet,trace}.py``, so that folder itself must never be
on ``sys.path``: import it only as the package ``dispatch_rules``.)
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("directory", [".", "tests", "examples", "benchmarks"])
def test_import_from(directory):
    result = subprocess.run(
        [sys.executable, "-c", "import cola, cola_curvature, dispatch_rules"],
        cwd=ROOT / directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_no_folder_or_module_shadows_a_cola_subpackage():
    shadowing = {"inverse", "eig", "logdet", "trace", "unary", "decompositions", "svd"}
    shadowing |= {"preconditioning", "tbd"}
    top_level = {p.stem for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}
    assert not top_level & shadowing
    for folder in ROOT.rglob("*"):
        hidden = any(part.startswith(".") for part in folder.relative_to(ROOT).parts)
        if folder.is_dir() and not hidden and folder.name in shadowing:
            raise AssertionError(f"{folder} is named after a cola.linalg subpackage")
