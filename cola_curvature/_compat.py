"""The CoLA this package is pinned to, checked at import, with the shims it needs on current JAX."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

COLA_VERSION = "0.0.7"
BEARTYPE_BELOW = (0, 23)


def _installed(distribution: str) -> str | None:
    """Return the installed version of ``distribution``, or ``None``."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def check_environment() -> None:
    """Raise ``ImportError`` naming the fix when CoLA's dependencies are in a state that breaks it.

    ``plum-dispatch`` installs the same ``plum`` module as CoLA's fork
    ``cola-plum-dispatch`` (``import cola`` then fails), and ``beartype>=0.23`` makes
    CoLA's own ``add`` dispatch ambiguous.
    """
    if _installed("plum-dispatch") is not None:
        raise ImportError(
            "plum-dispatch is installed next to cola-plum-dispatch and replaces the plum module "
            "CoLA needs; run `pip uninstall -y plum-dispatch && pip install --force-reinstall "
            "cola-plum-dispatch`."
        )
    beartype = _installed("beartype")
    if beartype is not None and tuple(int(p) for p in beartype.split(".")[:2]) >= BEARTYPE_BELOW:
        raise ImportError(
            f"beartype {beartype} makes CoLA's dispatch ambiguous; install 'beartype<0.23'."
        )
    cola = _installed("cola-ml")
    if cola != COLA_VERSION:
        raise ImportError(f"cola_curvature needs cola-ml=={COLA_VERSION}, found {cola}.")


def _jax_clip(array: Any, a_min: Any = None, a_max: Any = None) -> Any:
    """``jnp.clip`` with CoLA's ``a_min``/``a_max`` keywords (JAX 0.10 renamed them)."""
    import jax.numpy as jnp

    return jnp.clip(array, min=a_min, max=a_max)


def patch_cola_jax_backend() -> None:
    """Make CoLA's JAX backend call ``jnp.clip`` with the keywords current JAX accepts.

    CoLA 0.0.7's GMRES and Arnoldi call ``xnp.clip(x, a_min=..., a_max=...)``; JAX 0.10
    removed those keywords. Only done when JAX is installed; importing CoLA's JAX
    backend then imports JAX.
    """
    if find_spec("jax") is None:
        return
    from cola.backends import jax_fns

    jax_fns.clip = _jax_clip


check_environment()
patch_cola_jax_backend()
