"""Pictures for people: per-case slice overlays of input vs reconstructed surface, and training curves.

Matplotlib through ``Figure`` + the Agg canvas (no pyplot global state), written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ctvq.atomic import atomic_output
from ctvq.ct.sample import FigurePlanes
from ctvq.eval.loading import EvalInputError
from ctvq.eval.surfaces import DenseBox

INPUT_COLOUR = "#00e000"
RECON_COLOUR = "#ff2bd6"
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))
CURVE_GROUPS = (("loss", "loss"), ("codebook usage", "usage"), ("perplexity", "perplexity"))


def box_slice(box: DenseBox, axis: int, index: int, size: int) -> np.ma.MaskedArray:
    """Slice ``index`` along ``axis`` of a box, placed on the ``size``² grid; unknown voxels masked."""
    other = [a for a in range(3) if a != axis]
    values = np.zeros((size, size), dtype=np.float32)
    known = np.zeros((size, size), dtype=bool)
    local = index - int(box.origin[axis])
    if 0 <= local < box.values.shape[axis]:
        v = box.values[(slice(None),) * axis + (local,)]
        k = box.known[(slice(None),) * axis + (local,)]
        lo = box.origin[other]
        src = [slice(max(0, -lo[i]), min(v.shape[i], size - lo[i])) for i in range(2)]
        dst = [slice(lo[i] + src[i].start, lo[i] + src[i].stop) for i in range(2)]
        values[dst[0], dst[1]] = v[src[0], src[1]]
        known[dst[0], dst[1]] = k[src[0], src[1]]
    return np.ma.masked_array(values, ~known)


def _has_crossing(field: np.ma.MaskedArray) -> bool:
    data = field.compressed()
    return data.size > 0 and data.min() < 0 < data.max()


def save_case_figure(path: str | os.PathLike, case_id: str, input_box: DenseBox, recon_box: DenseBox,
                     centre: np.ndarray, resolution: int, background: FigurePlanes | None = None,
                     summary: Mapping[str, float | None] | None = None) -> None:
    """Axial / coronal / sagittal slices through ``centre``: windowed CT (``background``, planes through
    the same centre; without it, the input SDF) with the input and the reconstructed zero level drawn in
    two colours."""
    if background is not None and not np.array_equal(background.centre, centre):
        raise ValueError(f"figure planes through {background.centre.tolist()}, figure through "
                         f"{np.asarray(centre).tolist()}")
    fig = Figure(figsize=(13.5, 5.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (label, axis) in zip(axes, VIEWS, strict=True):
        index = int(centre[axis])
        field_in = box_slice(input_box, axis, index, resolution)
        field_rec = box_slice(recon_box, axis, index, resolution)
        if background is not None:
            ax.imshow(background.plane(axis).T, cmap="gray", vmin=0.0, vmax=1.0,
                      origin="lower", interpolation="nearest")
        else:
            ax.imshow(np.zeros((resolution, resolution)), cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
            ax.imshow(field_in.T, cmap="coolwarm", vmin=-1.0, vmax=1.0, origin="lower",
                      interpolation="nearest")
        for field, colour in ((field_in, INPUT_COLOUR), (field_rec, RECON_COLOUR)):
            if _has_crossing(field):
                ax.contour(field.T, levels=[0.0], colors=colour, linewidths=0.9)
        other = [a for a in range(3) if a != axis]
        lo = np.maximum(input_box.origin[other] - 4, 0)
        hi = np.minimum(input_box.origin[other] + np.array(input_box.values.shape)[other] + 4, resolution)
        ax.set_xlim(lo[0] - 0.5, hi[0] - 0.5)
        ax.set_ylim(lo[1] - 0.5, hi[1] - 0.5)
        names = "xyz"
        ax.set_title(f"{label} ({names[axis]}={index})", fontsize=10)
        ax.set_xlabel(names[other[0]], fontsize=8)
        ax.set_ylabel(names[other[1]], fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color=INPUT_COLOUR, lw=2, label="input surface (zero level)"),
               Line2D([], [], color=RECON_COLOUR, lw=2, label="reconstruction (zero level)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    back = "windowed CT" if background is not None else "input SDF (no windowed CT given; blue inside)"
    text = f"{case_id}   background: {back}"
    if summary:
        parts = [f"{k}={v:.3g}" for k, v in summary.items() if v is not None]
        text += "\n" + "   ".join(parts)
    fig.suptitle(text, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.93))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90)


def curve_columns(table: pd.DataFrame) -> dict[str, list[str]]:
    """The logged columns per panel: every column naming a loss, the codebook usage, the perplexity."""
    out: dict[str, list[str]] = {}
    for title, word in CURVE_GROUPS:
        # loss_scale is the fp16 scaler's state, not a loss
        cols = [c for c in table.columns if c not in ("step", "loss_scale") and word in c.lower()]
        if cols:
            out[title] = cols
    return out


def training_curves(logs: Sequence[str | os.PathLike], png: str | os.PathLike, csv: str | os.PathLike
                    ) -> list[str]:
    """PNG of loss / codebook usage / perplexity against step, and their CSV (step, stage, one column per
    metric: what `dvc plots show` reads). ``logs`` are `ctvq train` metrics.csv files in training order
    (stage 1, then stage 2): each continues the step count of the one before, and ``stage`` numbers them, so
    one curve shows the whole training. Returns the metric columns written."""
    tables, offset = [], 0
    for number, log in enumerate(map(Path, logs), start=1):
        if not log.is_file():
            raise EvalInputError(f"{log}: training log not found (the metrics.csv of a `ctvq train` run)")
        table = pd.read_csv(log)
        if "step" not in table.columns:
            raise EvalInputError(f"{log}: no 'step' column; expected the metrics.csv of a `ctvq train` run")
        table = table.assign(step=table["step"] + offset, stage=number)
        offset = int(table["step"].max()) if len(table) else offset
        tables.append(table)
    if not tables:
        raise EvalInputError("no training log given")
    table = pd.concat(tables, ignore_index=True)
    groups = curve_columns(table)
    if not groups:
        raise EvalInputError(f"{', '.join(map(str, logs))}: no loss, usage or perplexity column among "
                             f"{list(table.columns)}")
    columns = [c for cols in groups.values() for c in cols]
    fig = Figure(figsize=(4.5 * len(groups), 3.6))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    starts = [int(t["step"].min()) for t in tables[1:] if len(t)]
    for ax, (title, cols) in zip(axes, groups.items(), strict=True):
        for col in cols:
            rows = table[["step", col]].dropna()
            ax.plot(rows["step"], rows[col], label=col, lw=1.2)
        for start in starts:
            ax.axvline(start, color="grey", lw=0.8, ls="--")
        if title == "loss" and (table[cols].dropna() > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(title + (" (dashed: next stage)" if starts else ""), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, dpi=90)
    with atomic_output(csv) as tmp:
        table[["step", "stage", *columns]].to_csv(tmp, index=False)
    return columns


__all__ = ["box_slice", "curve_columns", "save_case_figure", "training_curves"]
