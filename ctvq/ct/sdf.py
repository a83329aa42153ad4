"""Narrow-band signed distance to the iso-surface of a windowed volume, in voxels, negative inside.

Why this method: a full-grid exact EDT of a 512³ cube takes about a minute and gigabytes, and is only
voxel-accurate (distances between voxel centres). Here the work is proportional to the band:

1. Interface voxels (a 6-neighbour on the other side of ``iso``) get a sub-voxel distance from the surface
   crossings on their grid edges, with the crossing placed by linear interpolation (the same points that
   marching cubes uses): the distance to the plane through the axis intercepts, ``1 / sqrt(sum 1 / h_a²)``,
   exact for a planar surface.
2. The distance is propagated outward with the first-order upwind Eikonal update
   (``sum_a max(d - m_a, 0)² = 1``; exact for planar fronts), accepting voxels in buckets of increasing
   distance (a vectorised fast-marching order), each bucket iterated until no value changes, then one
   checking sweep (and the few follow-ups it triggers): the result is the fixed point of the discrete
   problem, the same as a full-grid solve (tested). A voxel whose estimate
   exceeds ``band + margin`` is never expanded, since distances only grow outward.

Only the band's voxels are ever listed (as sorted index arrays, so the neighbour gathers stream through
memory); a float32 distance grid and a uint8 state grid over the surface's bounding box are the only
large buffers.
"""

from __future__ import annotations

import math

import numpy as np

from ctvq.ct.errors import CTInputError

_MIN_INTERCEPT = 1e-6
_LAYER_MARGIN = 0.5
_BUCKET = 1.0 / math.sqrt(3.0)
_FAR, _TENTATIVE, _ACCEPTED, _SEED, _BLOCKED = 0, 1, 2, 3, 4
_CONVERGED = 1e-5
_MAX_SWEEPS = 20


def narrow_band_sdf(volume: np.ndarray, iso_value: float, band: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (voxel coordinates (N, 3) int64 in the volume's index order, signed distances float32 in
    voxels) of the voxels with |d| <= band, in no particular order.

    ``volume`` is a 3-D array (any float or integer dtype, C- or Fortran-ordered: the work runs on the
    C-ordered view, so no copy is made); inside means ``volume > iso_value`` and has negative distance.
    Raises CTInputError if the iso-surface does not exist.
    """
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise CTInputError(f"volume of shape {volume.shape}: need a 3-D grid, >= 2 voxels per axis")
    if not band > 0:
        raise CTInputError(f"band {band}: must be > 0 voxels")
    transposed = volume.flags.f_contiguous and not volume.flags.c_contiguous
    work = volume.T if transposed else np.ascontiguousarray(volume)
    inside = np.greater(work, iso_value)
    idx, phi0 = interface_distances(work, inside, iso_value)
    if idx.size == 0:
        raise CTInputError(f"no iso-surface at {iso_value}: every voxel is on the same side")
    # the marching grids only span the interface's bounding box plus a margin the band cannot cross
    seed_coords = np.stack(np.unravel_index(idx, work.shape), axis=1)
    margin = int(math.ceil(band + _LAYER_MARGIN)) + 2
    lo = np.maximum(seed_coords.min(axis=0) - margin, 0)
    hi = np.minimum(seed_coords.max(axis=0) + margin + 1, work.shape)
    padded = tuple(int(n) + 2 for n in hi - lo)
    dist = np.full(math.prod(padded), np.inf, dtype=np.float32)
    _mark_padding(dist, padded, np.nan)
    seeds = np.ravel_multi_index(tuple((seed_coords - lo + 1).T), padded)
    del seed_coords
    state = np.zeros(dist.size, dtype=np.uint8)
    _mark_padding(state, padded, _BLOCKED)
    state[seeds] = _SEED
    dist[seeds] = phi0
    members = _march(dist, state, seeds, padded, band)
    _converge(dist, state, members, padded)
    del state
    all_members = np.concatenate([seeds, members])
    values = dist[all_members]
    keep = values <= band
    del dist
    coords = np.stack(np.unravel_index(all_members[keep], padded), axis=1) + (lo - 1)
    values = values[keep]
    flat_work = np.ravel_multi_index(tuple(coords.T), work.shape)
    signed = np.where(inside.ravel()[flat_work], -values, values).astype(np.float32)
    return (coords[:, ::-1] if transposed else coords), signed


def interface_distances(
    volume: np.ndarray, inside: np.ndarray, iso_value: float
) -> tuple[np.ndarray, np.ndarray]:
    """Interface voxels (flat indices, ascending) and their unsigned sub-voxel distances (float32)."""
    nx, ny, nz = volume.shape
    flat_inside = inside.ravel()
    flat_values = volume.ravel()
    keys, inv_sq = [], []
    for axis, stride in enumerate((ny * nz, nz, 1)):
        p = np.flatnonzero(flat_inside[stride:] != flat_inside[:-stride])
        if axis == 1:
            p = p[(p // nz) % ny != ny - 1]
        elif axis == 2:
            p = p[p % nz != nz - 1]
        a = flat_values[p].astype(np.float64)
        b = flat_values[p + stride].astype(np.float64)
        frac = np.clip((iso_value - a) / (b - a), 0.0, 1.0)
        # both edge ends, merged in index order (two sorted runs: a linear merge); a voxel crossing on
        # both sides along this axis keeps the nearer intercept
        ends, h = _merge_sorted([p, p + stride], [frac, 1.0 - frac])
        h = np.maximum(h, _MIN_INTERCEPT)
        start = _run_starts(ends)
        keys.append(ends[start])
        inv_sq.append(1.0 / np.minimum.reduceat(h, start) ** 2)
    voxels, total = _merge_sorted(keys, inv_sq)
    start = _run_starts(voxels)
    total = np.add.reduceat(total, start)
    return voxels[start], (1.0 / np.sqrt(total)).astype(np.float32)


def _merge_sorted(keys: list[np.ndarray], values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sorted runs and sort them stably (timsort merges runs in linear time)."""
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    return all_keys[order], np.concatenate(values)[order]


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal keys."""
    first = np.ones(sorted_keys.size, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.flatnonzero(first)


def _mark_padding(flat: np.ndarray, padded: tuple[int, int, int], value: float) -> None:
    """Fill the one-voxel frame (distance NaN: ignored by ``np.fmin``; state: never a candidate)."""
    grid = flat.reshape(padded)
    grid[0], grid[-1] = value, value
    grid[:, 0], grid[:, -1] = value, value
    grid[:, :, 0], grid[:, :, -1] = value, value


def _strides(padded: tuple[int, int, int]) -> tuple[int, int, int]:
    return (padded[1] * padded[2], padded[2], 1)


def _eikonal(dist: np.ndarray, at: np.ndarray, padded: tuple[int, int, int]) -> np.ndarray:
    """First-order upwind solution of |grad d| = 1 at ``at`` from the current neighbour values."""
    m = []
    for stride in _strides(padded):
        before = at - stride  # the voxel after is the same index into the view shifted by 2 strides
        m.append(np.fmin(dist[before], dist[2 * stride:][before]))
    a, b, c = m
    low, high = np.minimum(a, b), np.maximum(a, b, out=b)  # sorting network: m1 <= m2 <= m3
    m1, mid = np.minimum(low, c), np.maximum(low, c, out=c)
    m2, m3 = np.minimum(high, mid, out=a), np.maximum(high, mid, out=low)
    one, two, three = np.float32(1.0), np.float32(2.0), np.float32(3.0)
    with np.errstate(invalid="ignore", over="ignore"):
        d = m1 + one
        diff = m1 - m2
        d2 = m1 + m2
        d2 += np.sqrt(np.maximum(two - diff * diff, 0, out=diff), out=diff)
        d2 *= np.float32(0.5)
        np.copyto(d, d2, where=d > m2)
        s = m1 + m2
        s += m3
        q = m1 * m1
        q += m2 * m2
        q += m3 * m3
        q -= one
        q *= three
        disc = s * s
        disc -= q
        s += np.sqrt(np.maximum(disc, 0, out=disc), out=disc)
        s /= three
        np.copyto(d, s, where=d > m3)
        return d


def _neighbours(at: np.ndarray, padded: tuple[int, int, int]) -> np.ndarray:
    """The six face neighbours of sorted ``at``, as six sorted runs (offset-major)."""
    return np.concatenate([at + s * sign for s in _strides(padded) for sign in (-1, 1)])


def _sorted_unique(runs: np.ndarray) -> np.ndarray:
    """Sorted unique values of a concatenation of a few sorted runs (timsort merges them linearly).

    Keeping every index list sorted makes the six neighbour gathers of the Eikonal update six monotone
    streams through memory, which is what makes the update fast on a 512³ grid.
    """
    if runs.size == 0:
        return runs
    merged = np.sort(runs, kind="stable")
    return merged[_run_starts(merged)]


def _march(
    dist: np.ndarray, state: np.ndarray, seeds: np.ndarray, padded: tuple[int, int, int], band: float
) -> np.ndarray:
    """Accept voxels in buckets of increasing distance (width 1/sqrt(3)), settling each bucket on
    acceptance. Every index list stays sorted. Returns the accepted non-seeds (sorted)."""
    limit = band + _LAYER_MARGIN
    tentative = np.empty(0, dtype=np.int64)
    newly = seeds
    accepted = []
    while True:
        cand = _neighbours(newly, padded)
        cand = _sorted_unique(cand[state[cand] <= _TENTATIVE])
        fresh = cand[state[cand] == _FAR]
        dist[cand] = np.fmin(dist[cand], _eikonal(dist, cand, padded))
        state[fresh] = _TENTATIVE
        tentative = _sorted_unique(np.concatenate([tentative, fresh]))
        if tentative.size == 0:
            break
        values = dist[tentative]
        take = values < values.min() + np.float32(_BUCKET)
        newly = tentative[take & (values <= limit)]
        tentative = tentative[~take]
        if newly.size == 0:
            break
        state[newly] = _ACCEPTED
        _settle(dist, newly, padded)
        accepted.append(newly)
    return _sorted_unique(np.concatenate(accepted)) if accepted else np.empty(0, dtype=np.int64)


def _settle(dist: np.ndarray, group: np.ndarray, padded: tuple[int, int, int]) -> None:
    """Iterate a just-accepted bucket towards its fixed point (a voxel may lean on a slightly nearer
    bucket-mate); once few voxels move, only those are revisited. ``_converge`` makes it exact."""
    for _ in range(_MAX_SWEEPS):
        old = dist[group]
        new = np.fmin(old, _eikonal(dist, group, padded))
        dist[group] = new
        moved = old - new > _CONVERGED
        if not moved.any():
            return
        if moved.mean() < 0.25:
            group = group[moved]


def _converge(dist: np.ndarray, state: np.ndarray, members: np.ndarray, padded: tuple[int, int, int]) -> None:
    """Sweep until no accepted value changes: one full sweep, then only accepted neighbours of changed
    voxels. Seeds stay fixed."""
    active = members
    for _ in range(_MAX_SWEEPS):
        if active.size == 0:
            return
        old = dist[active]
        new = np.fmin(old, _eikonal(dist, active, padded))
        dist[active] = new
        changed = active[old - new > _CONVERGED]
        nb = _neighbours(changed, padded)
        active = _sorted_unique(nb[state[nb] == _ACCEPTED])
    raise RuntimeError(f"narrow-band distance did not converge in {_MAX_SWEEPS} sweeps")
