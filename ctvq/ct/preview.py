"""Pictures for people: orthogonal slices of a windowed cube (and of its band), as a radiologist reads them.

Radiological orientation: axial and coronal show the patient's left on the image's right; axial has anterior
up, coronal and sagittal superior up, sagittal anterior on the left. Axes are patient millimetres (LPS, from
the affine) along the patient axis nearest each cube axis: exact for the axis-aligned cubes ``ctvq window``
makes, and off by the residual rotation of an oblique scan (the affine says by how much).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctvq.atomic import atomic_output
from ctvq.ct.sample import SparseSample, band_centre

FIGURE_INCHES = (12.0, 4.4)
DPI = 80  # the PNG is FIGURE_INCHES * DPI pixels: 960 x 352
# view: (patient axis it cuts through, horizontal patient axis, vertical patient axis, vertical grows up)
VIEWS = {"axial": (2, 0, 1, False), "coronal": (1, 0, 2, True), "sagittal": (0, 1, 2, True)}
_LABELS = {0: "x mm (R → L)", 1: "y mm (A → P)", 2: "z mm (I → S)"}


@dataclass(frozen=True)
class View:
    """One slice ready for ``imshow(image, origin="upper", extent=extent)``: row 0 is the image's top."""

    name: str
    index: int  # the slice's index along the cube axis it cuts
    image: np.ndarray
    extent: tuple[float, float, float, float]  # left, right, bottom, top (mm)
    xlabel: str
    ylabel: str


def patient_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient axis nearest each cube axis, its sign); refuses an affine that maps two cube axes alike."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    axis = np.argmax(np.abs(linear), axis=0)
    if sorted(axis.tolist()) != [0, 1, 2]:
        raise ValueError(f"affine {linear.tolist()} maps two cube axes onto one patient axis")
    return axis, np.sign(linear[axis, np.arange(3)])


def orient(cube: np.ndarray, affine: np.ndarray, view: str, index: int) -> View:
    """Slice ``index`` of ``cube`` (indexed x, y, z) for ``view`` (axial, coronal, sagittal), flipped into
    radiological orientation, with its extent in mm."""
    normal, across, down, up = VIEWS[view]
    axis_of, sign = patient_axes(affine)
    cube_axis = {int(p): a for a, p in enumerate(axis_of)}
    k, h, v = cube_axis[normal], cube_axis[across], cube_axis[down]
    plane = cube[(slice(None),) * k + (index,)]  # a view: np.take along an axis copies the whole cube
    rest = [a for a in range(3) if a != k]
    image = plane if rest.index(v) == 0 else plane.T  # rows: vertical cube axis, columns: horizontal
    if sign[h] < 0:  # the horizontal patient coordinate grows to the right
        image = image[:, ::-1]
    if (sign[v] > 0) == up:  # row 0 at the top: the largest coordinate when it grows up, else the smallest
        image = image[::-1, :]
    centre = np.full(3, (cube.shape[0] - 1) / 2.0)
    centre[k] = index

    def span(cube_ax: int, patient_ax: int) -> tuple[float, float]:
        ends = []
        for i in (-0.5, cube.shape[cube_ax] - 0.5):
            point = centre.copy()
            point[cube_ax] = i
            ends.append(float((np.asarray(affine)[:3, :3] @ point + np.asarray(affine)[:3, 3])[patient_ax]))
        return min(ends), max(ends)

    left, right = span(h, across)
    low, high = span(v, down)
    bottom, top = (low, high) if up else (high, low)
    return View(view, int(index), np.ascontiguousarray(image), (left, right, bottom, top),
                _LABELS[across], _LABELS[down])


def _figure() -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=FIGURE_INCHES)  # no pyplot: no global backend state, safe in any process
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, 3)


def _save(fig: Figure, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def _draw(ax, view: View) -> None:  # noqa: ANN001 (a matplotlib Axes)
    ax.imshow(view.image, cmap="gray", vmin=0.0, vmax=1.0, origin="upper", extent=view.extent)
    ax.set_title(f"{view.name} {view.index}", fontsize=9)
    ax.set_xlabel(view.xlabel, fontsize=8)
    ax.set_ylabel(view.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


def save_window_preview(values: np.ndarray, affine: np.ndarray, path: str | os.PathLike, title: str = "",
                        centre: np.ndarray | None = None, iso_value: float | None = None) -> None:
    """Axial, coronal and sagittal slices of a windowed cube (values in [0, 1]) through ``centre`` (cube
    indices; default the cube's centre), as a PNG of ``FIGURE_INCHES * DPI`` pixels; ``iso_value`` draws
    the window's iso level (the surface ``ctvq sdf`` will find, before island removal) in yellow."""
    res = values.shape[0]
    centre = np.full(3, res // 2) if centre is None else np.asarray(centre, dtype=int)
    fig, axes = _figure()
    axis_of, _ = patient_axes(affine)
    for ax, name in zip(axes, VIEWS, strict=True):
        k = int(np.flatnonzero(axis_of == VIEWS[name][0])[0])
        view = orient(values, affine, name, int(centre[k]))
        _draw(ax, view)
        if iso_value is not None and view.image.min() < iso_value < view.image.max():
            ax.contour(view.image, levels=[iso_value], colors="yellow", linewidths=0.6, origin="upper",
                       extent=view.extent)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_failure_preview(path: str | os.PathLike, case_id: str, status: str) -> None:
    """A picture that says the case failed and why, in place of its preview: a gallery of previews then
    shows every case, the failed ones among them."""
    fig = Figure(figsize=FIGURE_INCHES)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.6, case_id, ha="center", va="center", fontsize=14)
    fig.text(0.5, 0.4, textwrap.fill(status, 110), ha="center", va="center", fontsize=9, color="firebrick")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def dense_sdf(sample: SparseSample) -> np.ndarray:
    """The band on the full grid (NaN outside it), float32; for previews and tests on small grids."""
    grid = np.full((sample.resolution,) * 3, np.nan, dtype=np.float32)
    c = sample.coords.astype(np.intp)
    grid[c[:, 0], c[:, 1], c[:, 2]] = sample.sdf
    return grid


def save_preview(values: np.ndarray, sample: SparseSample, path: str | os.PathLike) -> None:
    """The window preview through the band's centre, band in colour and its zero level as a line."""
    sdf = dense_sdf(sample)
    centre = band_centre(sample.coords) if sample.num_points else \
        np.full(3, sample.resolution // 2)
    fig, axes = _figure()
    axis_of, _ = patient_axes(sample.affine)
    for ax, name in zip(axes, VIEWS, strict=True):
        index = int(centre[int(np.flatnonzero(axis_of == VIEWS[name][0])[0])])
        view = orient(values, sample.affine, name, index)
        band = orient(sdf, sample.affine, name, index).image
        _draw(ax, view)
        ax.imshow(np.ma.masked_invalid(band), cmap="coolwarm", vmin=-1.0, vmax=1.0, alpha=0.45,
                  origin="upper", extent=view.extent)
        if np.isfinite(band).any() and np.nanmin(band) < 0 < np.nanmax(band):
            ax.contour(np.nan_to_num(band, nan=1.0), levels=[0.0], colors="yellow", linewidths=0.6,
                       origin="upper", extent=view.extent)
    fig.suptitle(f"{sample.case_id}  window={sample.window}  points={sample.num_points}  "
                 f"latent={sample.num_latent}  (band: blue inside, red outside; yellow: zero level)",
                 fontsize=9)
    _save(fig, path)
