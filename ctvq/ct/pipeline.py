"""The preprocessing chain as plain functions: scan -> windowed volume -> band -> training sample.

The CLI steps and the datasets (``precompute_sparse=false``) call exactly these, so an on-the-fly sample
equals the precomputed one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ctvq.ct.band import BandField, compute_band
from ctvq.ct.case_id import safe_case_id
from ctvq.ct.errors import CTInputError
from ctvq.ct.index import build_index
from ctvq.ct.io import FILE_SUFFIXES, CTImage, read_ct
from ctvq.ct.resample import canonical_orientation, resample_to_cube, scan_extent
from ctvq.ct.sample import SparseSample
from ctvq.ct.surface import SurfaceSettings, foreign_objects, smooth_hu, surface_settings
from ctvq.ct.volume_file import WindowedVolume, load_windowed
from ctvq.ct.windows import Window

__all__ = ["build_band", "build_sample", "default_case_id", "load_windowed", "window_image", "window_scan"]


def default_case_id(path: str | os.PathLike) -> str:
    """File name without its image suffixes (``chest.nii.gz`` -> ``chest``); a folder keeps its name.

    Characters a file name may not carry safely (spaces, ...) become '_' (see ``ctvq.ct.case_id``)."""
    name = Path(path).name
    for suffix in sorted((*FILE_SUFFIXES, ".npz"), key=len, reverse=True):  # .nii.gz before .nii
        if name.lower().endswith(suffix):
            return safe_case_id(name[: -len(suffix)])
    return safe_case_id(name)


def window_image(ct: CTImage, window: Window, resolution: int, case_id: str,
                 surface: SurfaceSettings | None = None) -> WindowedVolume:
    """Resample ``ct`` into the ``resolution``³ cube and apply ``window`` in place (one full-size buffer).

    The scan is put into LPS orientation first (see ``ctvq.ct.resample``), so the cube, its affine and the
    recorded spacing (in that axis order) do not depend on how the file stored its axes. ``surface`` (None:
    the window's defaults, ``ctvq.ct.surface.SURFACE_DEFAULTS``) smooths the scan, pads the cube and drops
    objects outside the body here; its island size is applied by ``build_band`` at the iso value.
    """
    surface = (surface or surface_settings(window.name)).check()
    ct = canonical_orientation(ct)
    resample_from = ct
    if surface.smooth_mm > 0:
        resample_from = replace(ct, hu=smooth_hu(ct.hu, ct.spacing, surface.smooth_mm))
    cube, affine = resample_to_cube(resample_from, resolution, pad=surface.pad)
    del resample_from
    extent = scan_extent(ct, affine)
    step = float(np.linalg.norm(affine[:3, 0]))
    foreign = foreign_objects(cube, step, extent) if surface.body_mask else None
    values = window.apply(cube, out=cube)
    if foreign is not None:
        np.copyto(values, np.float32(0.0), where=foreign)
        del foreign
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        side = "below" if hi == 0.0 else "above"
        raise CTInputError(f"{ct.source}: window {window.name!r} (W={window.width:g}, L={window.level:g}) "
                           f"has no surface: every voxel is {side} the window")
    return WindowedVolume(values=values, affine=affine, window=window, case_id=case_id, source=ct.source,
                          spacing=ct.spacing, surface=surface, scan_extent=extent)


def window_scan(path: str | os.PathLike, window: Window, resolution: int,
                case_id: str | None = None, surface: SurfaceSettings | None = None,
                series_uid: str | None = None) -> WindowedVolume:
    """Read a scan file or DICOM folder (``series_uid``: one series of several) and window it (see
    ``window_image``)."""
    ct = read_ct(path, series_uid=series_uid)
    return window_image(ct, window, resolution, case_id or default_case_id(path), surface)


def build_band(windowed_volume: WindowedVolume, band: float = 3.0, iso_value: float = 0.5) -> BandField:
    return compute_band(windowed_volume, band=band, iso_value=iso_value)


def build_sample(windowed_volume: WindowedVolume, band: float = 3.0, iso_value: float = 0.5) -> SparseSample:
    """The training sample of a windowed volume: narrow-band SDF plus sparse index, in memory."""
    return build_index(compute_band(windowed_volume, band=band, iso_value=iso_value))
