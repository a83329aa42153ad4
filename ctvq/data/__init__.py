"""Training data: the sample contract, datasets over samples, the point-budget crop and the sparse collate.

The names below resolve on first access: the collate needs torch, and preprocessing (which only reads and
writes samples) must not pay for it. Library code imports the submodule it uses (``ctvq.data.sample``).
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "SparseCollate": "collate", "collate_sparse": "collate", "split_batch": "collate",
    "choose_crop_cells": "crop", "crop_to_budget": "crop", "select_cells": "crop",
    "CTWindowSparseSDF": "datasets", "DatasetError": "datasets", "SparseSDF": "datasets",
    "sample_to_item": "datasets",
    "SampleFormatError": "sample", "SparseSample": "sample", "decoder_targets": "sample",
    "load_sample": "sample", "save_sample": "sample",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
