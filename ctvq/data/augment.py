"""Training augmentation: the symmetries of the voxel cube, applied to a sparse sample exactly.

A tokenizer trained on a handful of cases memorises where each structure sits (the decoder has an absolute
position embedding and sees the whole latent set) instead of learning local shape: measured on bone phantoms
at 64³, 1200 steps reached occupancy IoU 0.63-0.69 on the 6 training cases and 0.36 on held-out ones.

Axis flips and axis permutations map the 8³ latent grid onto itself (the resolution is a multiple of 8), so
every cell keeps all of its band points and its ``inside_bits``: the augmented sample is the case's exact
sample in another orientation, with no resampling. ``flips`` draws one of the 8 flip combinations, ``cube``
one of the 48 symmetries of the cube (flips and axis orders). The affine is updated with the voxels, so the
sample still maps to the same patient millimetres.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import permutations

import numpy as np

from ctvq.choices import AUGMENTS
from ctvq.ct.sample import CELL_VOXELS, LATENT_STRIDE, SparseSample

_ORDERS = tuple(permutations(range(3)))


Symmetry = tuple[tuple[int, int, int], tuple[bool, bool, bool]]  # (axis order, flipped axes)


def random_symmetry(rng: np.random.Generator, augment: str) -> Symmetry:
    """(axis order, flipped axes) drawn uniformly among the symmetries ``augment`` allows."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}; use one of {AUGMENTS}")
    if augment == "none":
        return (0, 1, 2), (False, False, False)
    order = _ORDERS[int(rng.integers(len(_ORDERS)))] if augment == "cube" else (0, 1, 2)
    flips = tuple(bool(b) for b in rng.integers(0, 2, size=3))
    return order, flips  # type: ignore[return-value]


def _transform_coords(coords: np.ndarray, size: int, order: tuple[int, ...], flips: tuple[bool, ...]
                      ) -> np.ndarray:
    out = coords[:, list(order)].astype(np.int64)
    for axis, flip in enumerate(flips):
        if flip:
            out[:, axis] = size - 1 - out[:, axis]
    return out


def voxel_transform(resolution: int, order: tuple[int, ...], flips: tuple[bool, ...]) -> np.ndarray:
    """(4, 4) matrix taking an old voxel index (x, y, z, 1) to its index after the symmetry."""
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for axis, (source, flip) in enumerate(zip(order, flips, strict=True)):
        t[axis, source] = -1.0 if flip else 1.0
        t[axis, 3] = resolution - 1 if flip else 0.0
    return t


def apply_symmetry(sample: SparseSample, order: tuple[int, ...], flips: tuple[bool, ...]) -> SparseSample:
    """``sample`` with its axes reordered (new axis i = old axis ``order[i]``) and then flipped."""
    if tuple(order) == (0, 1, 2) and not any(flips):
        return sample
    res = sample.resolution
    if res % LATENT_STRIDE:
        raise ValueError(f"resolution {res} is not a multiple of {LATENT_STRIDE}: the latent grid has none")
    coords = _transform_coords(sample.coords, res, order, flips)
    latent = _transform_coords(sample.latent_coords, res // LATENT_STRIDE, order, flips)
    cell_order = np.lexsort((latent[:, 2], latent[:, 1], latent[:, 0]))
    new_rank = np.empty_like(cell_order)
    new_rank[cell_order] = np.arange(cell_order.size)
    counts = np.diff(sample.cell_start)
    local = coords % LATENT_STRIDE
    local_index = (local[:, 0] * LATENT_STRIDE + local[:, 1]) * LATENT_STRIDE + local[:, 2]
    point_cell = np.repeat(new_rank, counts)
    point_order = np.lexsort((local_index, point_cell))
    m = sample.num_latent
    inside = np.unpackbits(sample.inside_bits, axis=1, count=CELL_VOXELS).reshape(m, 8, 8, 8)
    inside = inside.transpose(0, *(1 + a for a in order))
    flipped_axes = tuple(1 + axis for axis, flip in enumerate(flips) if flip)
    if flipped_axes:
        inside = np.flip(inside, axis=flipped_axes)
    inside_bits = np.packbits(inside[cell_order].reshape(m, CELL_VOXELS), axis=1)
    transform = voxel_transform(res, order, flips)
    return replace(
        sample,
        coords=coords[point_order].astype(sample.coords.dtype),
        sdf=sample.sdf[point_order],
        latent_coords=latent[cell_order].astype(sample.latent_coords.dtype),
        cell_start=np.concatenate([[0], np.cumsum(counts[cell_order])]).astype(np.int64),
        inside_bits=inside_bits,
        affine=sample.affine @ np.linalg.inv(transform),
    )


__all__ = ["AUGMENTS", "apply_symmetry", "random_symmetry", "voxel_transform"]
