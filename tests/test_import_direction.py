"""Every import points down the layers of ``docs/architecture.md``.

The layers, lowest first: foundation (options, losses, tracing helpers, the backend-neutral
KFAC statistics, the reference models), backends (torch, JAX), operators, algorithms
(``matfree``), rules (``dispatch_rules``), pipelines (Laplace, estimators, optimizers,
interop, plotting) and the face (``cola_curvature/__init__``). A module may import its own
layer and the layers below it, never one above; besides, the two backends never import each
other, and algorithms and rules never import a backend (they are backend-neutral). Imports
inside functions count too. The modules are read as text (``ast``), nothing is imported.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Layer of a module, by the longest matching prefix of its dotted name.
LAYERS = {
    "cola_curvature._compat": 0,
    "cola_curvature._checks": 0,
    "cola_curvature._tracing": 0,
    "cola_curvature._loss_backend": 0,
    "cola_curvature.options": 0,
    "cola_curvature.parameter_layout": 0,
    "cola_curvature.types": 0,
    "cola_curvature.losses": 0,
    "cola_curvature.losses_extra": 0,
    "cola_curvature.losses_callable": 0,
    "cola_curvature.kfac_statistics": 0,
    "cola_curvature.models": 0,
    "cola_curvature.backends": 1,
    "cola_curvature.operators": 2,
    "cola_curvature.matfree": 3,
    "dispatch_rules": 4,
    "cola_curvature.estimators": 5,
    "cola_curvature.laplace": 5,
    "cola_curvature.laplace_subsets": 5,
    "cola_curvature.laplace_curvatures": 5,
    "cola_curvature.laplace_evidence": 5,
    "cola_curvature.laplace_predictive": 5,
    "cola_curvature.preconditioning": 5,
    "cola_curvature.plotting": 5,
    "cola_curvature.interop": 5,
    "cola_curvature.optim": 5,
    "cola_curvature": 6,
}
NAMES = ["foundation", "backends", "operators", "algorithms", "rules", "pipelines", "face"]
#: (importer prefix, imported prefix) pairs forbidden whatever the layers say.
NEVER = [
    ("cola_curvature.backends.torch", "cola_curvature.backends.jax"),
    ("cola_curvature.backends.jax", "cola_curvature.backends.torch"),
    ("cola_curvature.matfree", "cola_curvature.backends"),
    ("dispatch_rules", "cola_curvature.backends"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int | None:
    """Return the layer of a module; ``None`` for a module no entry of ``LAYERS`` names."""
    if name == "cola_curvature":
        return LAYERS[name]
    matches = [prefix for prefix in LAYERS if prefix != "cola_curvature" and within(name, prefix)]
    return LAYERS[max(matches, key=len)] if matches else None


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(path: Path) -> set[str]:
    """Return the project modules ``path`` imports (``from a.b import c`` gives ``a.b.c``
    when ``a/b/c`` is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if is_module(candidate) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {
        name for name in found if within(name, "cola_curvature") or within(name, "dispatch_rules")
    }


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


MODULES = sorted(
    [*ROOT.glob("cola_curvature/**/*.py"), *ROOT.glob("dispatch_rules/**/*.py")],
    key=module_name,
)


def test_every_module_has_a_layer():
    unplaced = [module_name(path) for path in MODULES if layer(module_name(path)) is None]
    assert not unplaced, f"add these modules to LAYERS (and docs/architecture.md): {unplaced}"
    assert {layer(module_name(path)) for path in MODULES} == set(range(len(NAMES)))


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down(path):
    importer = module_name(path)
    upward = [
        f"{importer} ({NAMES[layer(importer)]}) imports {name} ({NAMES[layer(name)]})"
        for name in sorted(imports(path))
        if layer(name) > layer(importer)
    ]
    forbidden = [
        f"{importer} imports {name}"
        for name in sorted(imports(path))
        for source, target in NEVER
        if within(importer, source) and within(name, target)
    ]
    assert not upward + forbidden, "\n".join(upward + forbidden)
