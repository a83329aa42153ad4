"""Point budget: cut a large case to a latent-grid-aligned spatial crop, never drop points at random.

Random point dropping punches holes into the narrow band and destroys the surface the model must learn.
Instead we keep whole 8³ latent cells around a random centre cell, nearest first, until the next cell would
exceed the budget. Every kept cell keeps all of its band points and its full ``inside_bits``, so the decoder
targets of the kept cells are exactly those of the uncropped case.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ctvq.ct.sample import SparseSample


def choose_crop_cells(
    counts: np.ndarray, latent_coords: np.ndarray, max_points: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Pick latent cells for a crop: returns (kept cell indices ascending, centre cell index).

    The centre is drawn uniformly among cells that fit the budget on their own. Cells are then ranked by
    Chebyshev distance to the centre (so the crop grows as a box of latent cells), ties by Euclidean distance
    (rounding the partial outer shell) and then by a random key; the longest prefix within ``max_points`` is
    kept. Hence every cell strictly nearer (Chebyshev) than the farthest kept cell is kept.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    fitting = np.flatnonzero(counts <= max_points)
    if fitting.size == 0:
        raise ValueError(
            f"max_points={max_points} is smaller than every latent cell of this case (smallest holds "
            f"{int(counts.min())} points); raise max_points to at least that"
        )
    centre = int(fitting[rng.integers(fitting.size)])
    offset = latent_coords.astype(np.int64) - latent_coords[centre].astype(np.int64)
    chebyshev = np.abs(offset).max(axis=1)
    squared = (offset**2).sum(axis=1)
    # lexsort: the last key is the primary one.
    order = np.lexsort((rng.random(counts.size), squared, chebyshev))
    order = order[order != centre]
    order = np.concatenate([[centre], order])
    within = np.cumsum(counts[order]) <= max_points
    n_kept = int(np.argmin(within)) if not within.all() else within.size
    return np.sort(order[:n_kept]), centre


def select_cells(sample: SparseSample, cells: np.ndarray) -> SparseSample:
    """The sub-sample made of whole latent cells ``cells`` (ascending indices), contract order preserved."""
    cells = np.asarray(cells, dtype=np.int64)
    if cells.size and (np.any(np.diff(cells) <= 0) or cells[0] < 0 or cells[-1] >= sample.num_latent):
        raise ValueError(f"cells must be ascending unique indices into {sample.num_latent} latent cells")
    counts = np.diff(sample.cell_start)
    keep_cell = np.zeros(sample.num_latent, dtype=bool)
    keep_cell[cells] = True
    keep_point = np.repeat(keep_cell, counts)
    cell_start = np.concatenate([[0], np.cumsum(counts[cells])]).astype(np.int64)
    return replace(
        sample,
        coords=sample.coords[keep_point],
        sdf=sample.sdf[keep_point],
        latent_coords=sample.latent_coords[cells],
        cell_start=cell_start,
        inside_bits=sample.inside_bits[cells],
    )

def crop_to_budget(sample: SparseSample, max_points: int, rng: np.random.Generator) -> SparseSample:
    """Return ``sample`` itself if it fits ``max_points``, else a latent-aligned crop that does."""
    if sample.num_points <= max_points:
        return sample
    cells, _ = choose_crop_cells(np.diff(sample.cell_start), sample.latent_coords, max_points, rng)
    return select_cells(sample, cells)
