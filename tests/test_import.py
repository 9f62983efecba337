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
START_DIRECTORIES = [".", "tests", "notebooks", "examples", "benchmarks"]
SHADOWING = {"inverse", "eig", "logdet", "trace", "unary", "decompositions", "svd"}
SHADOWING |= {"preconditioning", "tbd"}


IMPORT = "import cola, cola_curvature, dispatch_rules"


@pytest.fixture(scope="module")
def top_level_modules():
    """Run the import in a fresh interpreter from the repository root; its top-level modules.

    One interpreter (about 6 s) stands for all start directories: Python puts the start
    directory first on ``sys.path``, so the import from another directory fails exactly when
    that directory defines a module or regular package named like one the import loads.
    """
    report = "import sys; print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    result = subprocess.run(
        [sys.executable, "-c", f"{IMPORT}; {report}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"import failed from the repository root:\n{result.stderr}"
    return set(result.stdout.split())


def importable_names(directory: Path) -> set[str]:
    """What ``import name`` finds in ``directory`` ahead of site-packages: modules and packages.

    A folder without ``__init__.py`` is only a namespace portion, which any regular package of
    the same name later on ``sys.path`` takes precedence over; it is left to the test below.
    """
    names = set()
    for path in directory.iterdir():
        if path.is_file() and path.suffix in {".py", ".pyc", ".so", ".pyd"}:
            names.add(path.name.split(".")[0])
        elif path.is_dir() and (path / "__init__.py").is_file():
            names.add(path.name)
    return names


@pytest.mark.parametrize("directory", START_DIRECTORIES)
def test_import_from(directory, top_level_modules):
    if not (ROOT / directory).is_dir():
        pytest.skip(f"{directory}/ does not exist in this checkout")
    own = {"cola_curvature", "dispatch_rules"} if directory == "." else set()
    shadowing = (importable_names(ROOT / directory) - own) & top_level_modules
    assert not shadowing, f"{IMPORT!r} from {directory}/ would load {sorted(shadowing)} from there"


def test_cola_linalg_subpackages_are_the_ones_we_guard_against():
    import cola.linalg

    found = {path.name for path in Path(cola.linalg.__file__).parent.iterdir() if path.is_dir()}
    assert found - {"__pycache__"} <= SHADOWING


def test_no_folder_or_module_shadows_a_cola_subpackage():
    for directory in START_DIRECTORIES:
        if (ROOT / directory).is_dir():
            modules = {p.stem for p in (ROOT / directory).iterdir() if p.suffix == ".py"}
            assert not modules & SHADOWING, f"{directory}/ has a module named like cola.linalg's"
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        hidden = any(part.startswith(".") for part in parts)
        if path.is_dir() and not hidden and parts[0] != "build" and path.name in SHADOWING:
            raise AssertionError(f"{path} is named after a cola.linalg subpackage")
