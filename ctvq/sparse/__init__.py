"""Sparse voxel tensors and their layers (pure PyTorch, with spconv as an optional GPU conv backend).

Importing this package reads no environment variable and imports no optional extension.
"""

from ctvq.sparse.backends import SparseBackend, resolve_backend, spconv_available
from ctvq.sparse.basic import SparseGELU, SparseLinear, SparseSiLU, SparseTanh
from ctvq.sparse.conv import SparseConv3d, TorchsparseConvParams, set_sparse_backend
from ctvq.sparse.norm import SparseGroupNorm, SparseLayerNorm
from ctvq.sparse.spatial import SparseDownsample, SparseSubdivide, sparse_downsample, sparse_subdivide
from ctvq.sparse.tensor import CoordinateCache, SparseTensor

__all__ = [
    "CoordinateCache",
    "SparseBackend",
    "SparseConv3d",
    "SparseDownsample",
    "SparseGELU",
    "SparseGroupNorm",
    "SparseLayerNorm",
    "SparseLinear",
    "SparseSiLU",
    "SparseSubdivide",
    "SparseTanh",
    "SparseTensor",
    "TorchsparseConvParams",
    "resolve_backend",
    "set_sparse_backend",
    "sparse_downsample",
    "sparse_subdivide",
    "spconv_available",
]
