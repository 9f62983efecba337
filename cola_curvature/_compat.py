"""The CoLA this package is pinned to, checked at import, with the shims it needs on current JAX."""

from __future__ import annotations

import functools
import inspect
import re
import sys
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


def _jax_default_device() -> Any:
    """Return JAX's default device (the first of ``jax.devices()``)."""
    import jax

    return jax.devices()[0]


def _jax_array_device(array: Any) -> Any:
    """Return the one device holding ``array``, or ``None`` (traced, or sharded over several).

    ``None`` lets ``jnp.arange(..., device=None)`` and friends follow JAX's own placement,
    which inside ``jit`` is the sharding of the computation.
    """
    devices = getattr(array, "devices", None)
    if devices is None or "Tracer" in type(array).__name__:
        return None
    held = devices()
    return next(iter(held)) if len(held) == 1 else None


def patch_cola_jax_backend() -> None:
    """Fix two places where CoLA's JAX backend breaks on current JAX or several devices.

    * CoLA 0.0.7 sets ``cola.backends.jax_fns.clip = jnp.clip``, and its Arnoldi (hence
      GMRES) calls ``xnp.clip(x, a_min=...)``; JAX 0.10 removed those keywords. Patched
      when ``jnp.clip`` takes ``min``/``max`` (older JAX still accepts ``a_min``).
    * ``jax_fns.get_device`` of a traced array asks ``get_default_device``, which asserts
      that the host has exactly one device: every jit-compiled product fails on a host
      with several (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, a multi-GPU
      node), and a device it did return would pin new arrays inside ``jit`` to one device,
      against inputs sharded over a mesh. Patched: ``get_device`` gives the device of a
      single-device array and ``None`` otherwise (JAX then places by the sharding), and
      ``get_default_device`` gives JAX's default device.

    Done only when JAX is installed (importing CoLA's JAX backend imports JAX).
    """
    if find_spec("jax") is None:
        return
    from cola.backends import jax_fns

    jax_fns.get_default_device = _jax_default_device
    jax_fns.get_device = _jax_array_device
    if _jax_clip_takes_min_max():
        jax_fns.clip = _jax_clip


def cache_library_lookup() -> None:
    """Make CoLA's ``get_library_fns(dtype)`` a lookup cached per dtype.

    CoLA 0.0.7 answers it by allocating a probe array in every installed library
    (``jnp.array(0.1)``, ``torch.tensor(0.1)``) and casting it to ``dtype``: about 0.17 ms
    per call with JAX installed, and every CoLA operator's constructor calls it (building
    and applying ``inv(K + λI)`` and ``logdet`` of a small KFAC: 48–59 ms of thread time
    uncached, 38–41 ms cached). The answer depends on the dtype only, so it is cached; an
    unhashable dtype is passed through uncached. Every module of CoLA that bound the
    function at import is rebound.
    """
    from cola import backends

    original = backends.get_library_fns
    cached = functools.lru_cache(maxsize=None)(original)

    @functools.wraps(original)
    def get_library_fns(dtype: Any) -> Any:
        try:
            return cached(dtype)
        except TypeError:  # unhashable dtype
            return original(dtype)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "cola" and getattr(module, "get_library_fns", None) is original:
            module.get_library_fns = get_library_fns


check_environment()
patch_cola_jax_backend()
cache_library_lookup()
