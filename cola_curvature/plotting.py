"""Matplotlib drawing of spectral densities (the ``demo`` extra installs matplotlib)."""

from __future__ import annotations

from typing import Any

from cola_curvature.estimators import SpectralDensity


def plot_spectral_density(
    spectrum: SpectralDensity, ax: Any = None, *, log_density: bool = False, **line_kwargs: Any
) -> Any:
    """Draw ``spectrum.density`` over ``spectrum.grid`` on ``ax`` (a new figure's when ``None``).

    ``log_density`` puts the density on a log axis (Papyan 2020's view, where the outliers
    of a GGN spectrum stand out from its bulk); a density from
    :func:`~cola_curvature.estimators.log_spectral_density` gets a ``log10|λ|`` x-label.
    Returns the axes.

    Raises:
        ImportError: when matplotlib is not installed.

    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_spectral_density needs matplotlib: pip install 'cola-curvature[demo]'."
        ) from error
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(spectrum.grid, spectrum.density, **line_kwargs)
    if log_density:
        ax.set_yscale("log")
    ax.set_xlabel("log10 |eigenvalue|" if spectrum.log_scale else "eigenvalue")
    ax.set_ylabel("spectral density")
    return ax
