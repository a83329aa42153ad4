"""Training data: the sample contract, datasets over samples, the point-budget crop and the sparse collate."""

from ctvq.data.collate import SparseCollate, collate_sparse, split_batch
from ctvq.data.crop import choose_crop_cells, crop_to_budget, select_cells
from ctvq.data.datasets import CTWindowSparseSDF, DatasetError, SparseSDF, sample_to_item
from ctvq.data.sample import SampleFormatError, SparseSample, decoder_targets, load_sample, save_sample

__all__ = [
    "CTWindowSparseSDF",
    "DatasetError",
    "SampleFormatError",
    "SparseCollate",
    "SparseSDF",
    "SparseSample",
    "choose_crop_cells",
    "collate_sparse",
    "crop_to_budget",
    "decoder_targets",
    "load_sample",
    "sample_to_item",
    "save_sample",
    "select_cells",
    "split_batch",
]
