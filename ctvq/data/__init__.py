"""Training data: datasets over samples, the point-budget crop and the sparse collate (the sample format
itself is preprocessing's output, ``ctvq.ct.sample``, re-exported here for convenience).

The names below resolve on first access: the collate needs torch, and preprocessing (which only reads and
writes samples) must not pay for it. Library code imports the module it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "SparseCollate": "collate", "collate_sparse": "collate", "split_batch": "collate",
    "choose_crop_cells": "crop", "crop_to_budget": "crop", "select_cells": "crop",
    "CTWindowSparseSDF": "datasets", "DatasetError": "datasets", "SparseSDF": "datasets",
    "sample_to_item": "datasets",
    "SampleFormatError": "ctvq.ct.sample", "SparseSample": "ctvq.ct.sample",
    "decoder_targets": "ctvq.ct.sample", "load_sample": "ctvq.ct.sample", "save_sample": "ctvq.ct.sample",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = source if "." in source else f"{__name__}.{source}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
