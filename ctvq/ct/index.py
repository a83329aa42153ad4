"""Sparse-index precomputation: band voxels grouped by latent 8³ cell, as the training sample contract."""

from __future__ import annotations

import numpy as np

from ctvq.ct.band import BandField, flat_cells, occupied_cells
from ctvq.ct.errors import CTInputError
from ctvq.ct.sample import CELL_VOXELS, SparseSample, local_index, on_sdf_steps
from ctvq.ct.volume_file import extent_or_cube


def build_index(field: BandField) -> SparseSample:
    """Sort band voxels by latent cell (then local index) and attach ``cell_start``; validates the result.

    The key cell * 512 + local index is unique per voxel, so an unstable (faster) sort gives the order.
    """
    cells = flat_cells(field.coords, field.resolution)
    order = np.argsort(cells * CELL_VOXELS + local_index(field.coords))
    cells = cells[order]
    side = field.resolution // 8
    latent_ids = (field.latent_coords[:, 0].astype(np.int64) * side + field.latent_coords[:, 1]) * side \
        + field.latent_coords[:, 2]
    if not np.array_equal(occupied_cells(cells, side), latent_ids):
        raise CTInputError(f"{field.case_id}: latent cells disagree with the band voxels")
    cell_start = np.searchsorted(cells, latent_ids, side="left").astype(np.int64)
    cell_start = np.append(cell_start, np.int64(cells.size))
    sample = SparseSample(
        case_id=field.case_id,
        window=field.window.name,
        window_width=field.window.width,
        window_level=field.window.level,
        iso_value=field.iso_value,
        resolution=field.resolution,
        band=field.band,
        affine=np.asarray(field.affine, dtype=np.float64),
        coords=np.ascontiguousarray(field.coords[order]),
        sdf=on_sdf_steps(field.sdf[order]),
        latent_coords=np.ascontiguousarray(field.latent_coords),
        cell_start=cell_start,
        inside_bits=np.ascontiguousarray(field.inside_bits),
        source=field.source,
        spacing=np.asarray(field.spacing, dtype=np.float64),
        smooth_mm=float(field.surface.smooth_mm),
        min_island_mm3=float(field.surface.min_island_mm3),
        body_mask=bool(field.surface.body_mask),
        pad=str(field.surface.pad),
        scan_extent=extent_or_cube(field.scan_extent, field.resolution),
        figure_planes=field.figure_planes,
    )
    sample.validate(field.case_id)
    return sample
