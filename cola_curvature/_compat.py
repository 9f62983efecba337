"""The CoLA this package is pinned to, checked at import, with the shims it needs on current JAX."""

from __future__ import annotations

import inspect
import re
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


def _major_minor(release: str) -> tuple[int, int]:
    """Return ``(major, minor)`` of a version string such as ``"0.22.9"`` or ``"0.23rc1"``."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        raise ImportError(f"cannot parse the version {release!r}; expected 'MAJOR.MINOR...'.")
    return int(match.group(1)), int(match.group(2))


def check_environment() -> None:
    """Raise ``ImportError`` naming the fix when CoLA's dependencies are in a state that breaks it.

    Checked through package metadata before CoLA is imported, because the failures
    these cause inside ``import cola`` do not name their cause: ``plum-dispatch``
    installs the same ``plum`` module as CoLA's fork ``cola-plum-dispatch``
    (``'cond' is an invalid keyword argument``), and ``beartype>=0.23`` makes CoLA's own
    ``add`` dispatch ambiguous.

    Raises:
        ImportError: ``plum-dispatch`` is installed, ``cola-plum-dispatch`` is missing,
            ``beartype>=0.23`` is installed, or ``cola-ml`` is not version ``0.0.7``.
    """
    if _installed("plum-dispatch") is not None:
        raise ImportError(
            "plum-dispatch is installed next to cola-plum-dispatch and replaces the plum module "
            "CoLA needs; run `pip uninstall -y plum-dispatch && pip install --force-reinstall "
            "cola-plum-dispatch`."
        )
    if _installed("cola-plum-dispatch") is None:
        raise ImportError(
            "cola-plum-dispatch (CoLA's fork of plum) is not installed; run "
            "`pip install --force-reinstall cola-plum-dispatch`."
        )
    beartype = _installed("beartype")
    if beartype is not None and _major_minor(beartype) >= BEARTYPE_BELOW:
        raise ImportError(
            f"beartype {beartype} makes CoLA's dispatch ambiguous; run "
            "`pip install 'beartype>=0.18.5,<0.23'`."
        )
    cola = _installed("cola-ml")
    if cola != COLA_VERSION:
        found = "it is not installed" if cola is None else f"found {cola}"
        raise ImportError(
            f"cola_curvature needs cola-ml=={COLA_VERSION}, {found}; run "
            f"`pip install cola-ml=={COLA_VERSION}`."
        )


def _jax_clip(array: Any, a_min: Any = None, a_max: Any = None) -> Any:
    """``jnp.clip`` with CoLA's ``a_min``/``a_max`` keywords (JAX 0.10 renamed them)."""
    import jax.numpy as jnp

    return jnp.clip(array, min=a_min, max=a_max)


def _jax_clip_takes_min_max() -> bool:
    """Return whether the installed ``jnp.clip`` accepts ``min=``/``max=`` (JAX >= 0.4.27)."""
    import jax.numpy as jnp

    try:
        parameters = inspect.signature(jnp.clip).parameters
    except (TypeError, ValueError):  # no introspectable signature: assume current JAX
        return True
    return "min" in parameters and "max" in parameters


def patch_cola_jax_backend() -> None:
    """Make CoLA's JAX backend call ``jnp.clip`` with the keywords current JAX accepts.

    CoLA 0.0.7 sets ``cola.backends.jax_fns.clip = jnp.clip``, and its Arnoldi (hence
    GMRES) calls ``xnp.clip(x, a_min=...)``; JAX 0.10 removed those keywords. Done only
    when JAX is installed (importing CoLA's JAX backend then imports JAX) and its
    ``jnp.clip`` takes ``min``/``max``; older JAX still accepts ``a_min``/``a_max``.
    """
    if find_spec("jax") is None:
        return
    if not _jax_clip_takes_min_max():
        return
    from cola.backends import jax_fns

    jax_fns.clip = _jax_clip


check_environment()
patch_cola_jax_backend()
