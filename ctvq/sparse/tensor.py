"""The sparse voxel tensor: integer coordinates (batch, x, y, z) plus one feature row per voxel.

Rows are kept sorted by batch index so that every sample is one contiguous slice; the per-sample operators
(GroupNorm, full attention) rely on that. Coordinates are treated as read-only: everything derived from them
(coordinate hash, neighbour maps, pooling maps, backend index pairs) lives in an explicit `CoordinateCache`
bound to that one coords tensor and shared by every tensor made with `replace`, so no operator depends on the
order in which others ran.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from fractions import Fraction
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


class CoordinateCache:
    """Structures computed from one coords tensor, keyed by what else they depend on.

    Keys are tuples naming the structure and its parameters, e.g. ``("neighbors", kernel_size)`` or
    ``("spconv_indices", kernel_size)``. The cache refuses to serve a coords tensor other than its own.
    """

    def __init__(self, coords: torch.Tensor) -> None:
        self._coords = coords
        self._entries: dict[Hashable, Any] = {}

    @property
    def coords(self) -> torch.Tensor:
        return self._coords

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def get_or_build(self, key: Hashable, build: Callable[[torch.Tensor], _T]) -> _T:
        """Return the entry for `key`, building it from the bound coords on first use."""
        if key not in self._entries:
            self._entries[key] = build(self._coords)
        return self._entries[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


def _as_scale(scale: int | float | Fraction | tuple[Any, Any, Any]) -> tuple[Fraction, Fraction, Fraction]:
    values = scale if isinstance(scale, tuple) else (scale, scale, scale)
    if len(values) != 3:
        raise ValueError(f"SparseTensor scale must be one number or three (x, y, z); got {scale!r}")
    out = tuple(Fraction(v).limit_denominator(1 << 20) for v in values)
    if any(v <= 0 for v in out):
        raise ValueError(f"SparseTensor scale must be positive; got {scale!r}")
    return out  # type: ignore[return-value]


class SparseTensor:
    """Sparse voxels: `coords` [N, 4] int32/int64 (batch, x, y, z), `feats` [N, C] floating.

    `scale` is the voxel edge length relative to the input resolution per axis (1 at the input grid; a 2x
    downsample doubles it, a subdivide halves it). `spatial_shape` is the grid extent (x, y, z) at this scale;
    when not given it is the coordinate maximum + 1. `batch_size` may exceed the largest batch index + 1
    (trailing empty samples). Coordinates must be non-negative and rows sorted by batch index (use
    `from_unsorted` otherwise).
    """

    __slots__ = ("_coords", "_feats", "_batch_size", "_spatial_shape", "_scale", "_cache", "_offsets")

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        *,
        batch_size: int | None = None,
        spatial_shape: tuple[int, int, int] | None = None,
        scale: int | float | Fraction | tuple[Any, Any, Any] = 1,
        cache: CoordinateCache | None = None,
    ) -> None:
        _check_shapes(coords, feats)
        n = coords.shape[0]
        if n > 0:
            if bool((coords < 0).any()):
                bad = coords[(coords < 0).any(dim=1)][0].tolist()
                raise ValueError(f"SparseTensor coords must be non-negative; found row {bad}")
            batch = coords[:, 0]
            if n > 1 and bool((batch[1:] < batch[:-1]).any()):
                raise ValueError(
                    "SparseTensor rows must be sorted by batch index (each sample one contiguous slice); "
                    "build it with SparseTensor.from_unsorted(coords, feats)"
                )
            max_batch = int(batch[-1])
        else:
            max_batch = -1
        if batch_size is None:
            batch_size = max_batch + 1
        elif batch_size <= max_batch:
            raise ValueError(f"SparseTensor batch_size={batch_size} but coords hold batch index {max_batch}")
        if spatial_shape is None:
            spatial_shape = _extent(coords)
        else:
            spatial_shape = tuple(int(s) for s in spatial_shape)  # type: ignore[assignment]
            if len(spatial_shape) != 3:
                raise ValueError(
                    f"SparseTensor spatial_shape must have 3 entries (x, y, z); got {spatial_shape}"
                )
            if n > 0:
                hi = coords[:, 1:].amax(dim=0).tolist()
                if any(h >= s for h, s in zip(hi, spatial_shape, strict=True)):
                    raise ValueError(f"SparseTensor coords reach {hi}, outside spatial_shape {spatial_shape}")
        if cache is not None and cache.coords is not coords:
            raise ValueError("SparseTensor cache belongs to another coords tensor; pass cache=None")
        self._coords = coords
        self._feats = feats
        self._batch_size = batch_size
        self._spatial_shape: tuple[int, int, int] = spatial_shape  # type: ignore[assignment]
        self._scale = _as_scale(scale)
        self._cache = cache if cache is not None else CoordinateCache(coords)
        self._offsets: torch.Tensor | None = None

    @classmethod
    def from_unsorted(
        cls,
        coords: torch.Tensor,
        feats: torch.Tensor,
        **kwargs: Any,
    ) -> SparseTensor:
        """Sort rows by batch index (stable, so the order inside a sample is kept) and build the tensor."""
        _check_shapes(coords, feats)
        order = torch.argsort(coords[:, 0], stable=True)
        return cls(coords[order], feats[order], **kwargs)

    # -- data ----------------------------------------------------------------------------------------------
    @property
    def coords(self) -> torch.Tensor:
        return self._coords

    @property
    def feats(self) -> torch.Tensor:
        return self._feats

    @property
    def shape(self) -> tuple[int, int]:
        return (self._feats.shape[0], self._feats.shape[1])

    @property
    def num_voxels(self) -> int:
        return self._coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self._feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self._feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self._feats.dtype

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self._spatial_shape

    @property
    def scale(self) -> tuple[Fraction, Fraction, Fraction]:
        return self._scale

    @property
    def cache(self) -> CoordinateCache:
        return self._cache

    # -- per-sample layout ---------------------------------------------------------------------------------
    @property
    def batch_offsets(self) -> torch.Tensor:
        """Int64 [batch_size + 1] row offsets: sample b occupies rows offsets[b]:offsets[b + 1]."""
        if self._offsets is None:
            counts = torch.bincount(self._coords[:, 0].long(), minlength=self._batch_size)
            offsets = torch.zeros(self._batch_size + 1, dtype=torch.int64, device=self._coords.device)
            offsets[1:] = torch.cumsum(counts, 0)
            self._offsets = offsets
        return self._offsets

    @property
    def layout(self) -> list[slice]:
        """One row slice per sample (empty samples give empty slices)."""
        bounds = self.batch_offsets.tolist()
        return [slice(bounds[b], bounds[b + 1]) for b in range(self._batch_size)]

    @property
    def batch_counts(self) -> torch.Tensor:
        return torch.diff(self.batch_offsets)

    # -- derived tensors -----------------------------------------------------------------------------------
    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same voxels, new features: shares coords, layout and the coordinate cache."""
        _check_shapes(self._coords, feats)
        out = SparseTensor.__new__(SparseTensor)
        out._coords = self._coords
        out._feats = feats
        out._batch_size = self._batch_size
        out._spatial_shape = self._spatial_shape
        out._scale = self._scale
        out._cache = self._cache
        out._offsets = self._offsets
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Move to a device (new cache: cached index tensors live on the old device) and/or cast features."""
        feats = self._feats.to(device=device, dtype=dtype)
        if feats.device == self._feats.device:
            return self.replace(feats)
        return SparseTensor(
            self._coords.to(device),
            feats,
            batch_size=self._batch_size,
            spatial_shape=self._spatial_shape,
            scale=self._scale,
        )

    def dense(self) -> torch.Tensor:
        """Dense [B, C, X, Y, Z] grid (zeros at inactive sites): for tests and small debugging grids only."""
        b, x, y, z = self._coords.long().unbind(1)
        grid = self._feats.new_zeros((self._batch_size, *self._spatial_shape, self.num_channels))
        grid[b, x, y, z] = self._feats
        return grid.permute(0, 4, 1, 2, 3).contiguous()

    def __repr__(self) -> str:
        scale = tuple(str(s) for s in self._scale)
        return (
            f"SparseTensor(voxels={self.num_voxels}, channels={self.num_channels}, "
            f"batch_size={self._batch_size}, "
            f"spatial_shape={self._spatial_shape}, scale={scale}, dtype={self.dtype}, device={self.device})"
        )


def _check_shapes(coords: torch.Tensor, feats: torch.Tensor) -> None:
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(
            f"SparseTensor coords must be [N, 4] (batch, x, y, z); got shape {tuple(coords.shape)}"
        )
    if coords.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"SparseTensor coords must be int32 or int64; got {coords.dtype}")
    if feats.dim() != 2:
        raise ValueError(f"SparseTensor feats must be [N, C]; got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise ValueError(f"SparseTensor feats must be floating point; got {feats.dtype}")
    if feats.shape[0] != coords.shape[0]:
        raise ValueError(
            f"SparseTensor coords and feats disagree on N: coords {coords.shape[0]} rows, "
            f"feats {feats.shape[0]}"
        )
    if feats.device != coords.device:
        raise ValueError(f"SparseTensor coords on {coords.device} but feats on {feats.device}; move both")


def _extent(coords: torch.Tensor) -> tuple[int, int, int]:
    if coords.shape[0] == 0:
        return (0, 0, 0)
    hi = (coords[:, 1:].amax(dim=0) + 1).tolist()
    return (int(hi[0]), int(hi[1]), int(hi[2]))
