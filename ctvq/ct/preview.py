"""A picture per case for people: orthogonal slices of the windowed CT with the band and zero level drawn."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctvq.ct.atomic import atomic_output
from ctvq.data.sample import SparseSample


def dense_sdf(sample: SparseSample) -> np.ndarray:
    """The band on the full grid (NaN outside it), float32; for previews and tests on small grids."""
    grid = np.full((sample.resolution,) * 3, np.nan, dtype=np.float32)
    c = sample.coords.astype(np.intp)
    grid[c[:, 0], c[:, 1], c[:, 2]] = sample.sdf
    return grid


def save_preview(values: np.ndarray, sample: SparseSample, path: str | os.PathLike) -> None:
    """Axial, coronal and sagittal slices through the band's centre; band in colour, zero level as a line."""
    sdf = dense_sdf(sample)
    centre = np.round(sample.coords.mean(axis=0)).astype(int) if sample.num_points else \
        np.full(3, sample.resolution // 2)
    views = (("axial z", 2), ("coronal y", 1), ("sagittal x", 0))
    fig = Figure(figsize=(12, 4.4))  # no pyplot: no global backend state, safe in any process
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (label, axis) in zip(axes, views, strict=True):
        index = int(centre[axis])
        ct_slice = np.take(values, index, axis=axis).T
        band_slice = np.take(sdf, index, axis=axis).T
        ax.imshow(ct_slice, cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
        ax.imshow(np.ma.masked_invalid(band_slice), cmap="coolwarm", vmin=-1.0, vmax=1.0, alpha=0.45,
                  origin="lower")
        if np.isfinite(band_slice).any() and np.nanmin(band_slice) < 0 < np.nanmax(band_slice):
            ax.contour(np.nan_to_num(band_slice, nan=1.0), levels=[0.0], colors="yellow", linewidths=0.6)
        ax.set_title(f"{label}={index}")
        ax.set_axis_off()
    fig.suptitle(f"{sample.case_id}  window={sample.window}  points={sample.num_points}  "
                 f"latent={sample.num_latent}  (band: blue inside, red outside; yellow: zero level)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=80)
