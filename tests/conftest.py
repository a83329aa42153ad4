"""Shared fixtures: small real phantom scans (SimpleITK files) and pydicom's real CT slice.

The CT modules are imported inside the fixtures, so test files that need no scan (the GPU checks run on a
machine without SimpleITK) still collect.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from ctvq.ct.io import CTImage

SMALL_SHAPE = (96, 96, 32)
SMALL_SPACING = (0.8, 0.8, 2.5)


@pytest.fixture(scope="session")
def small_ct() -> CTImage:
    """A small anisotropic chest phantom, HU rounded to int16 like a stored scan."""
    from ctvq.ct.io import CTImage
    from ctvq.ct.phantom import chest_phantom

    ct = chest_phantom(SMALL_SHAPE, SMALL_SPACING, seed=3)
    return CTImage(hu=np.rint(ct.hu).astype(np.float32), spacing=ct.spacing, origin=(-12.5, 30.0, -400.0),
                   direction=ct.direction, source=ct.source)


@pytest.fixture(scope="session")
def small_scan(small_ct: CTImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_ct`` written as a compressed NIfTI file."""
    from ctvq.ct.io import write_ct

    path = tmp_path_factory.mktemp("scan") / "chest.nii.gz"
    write_ct(small_ct, path)
    return path


@pytest.fixture(scope="session")
def ct_small_dcm() -> Path:
    """pydicom's real single CT slice (128x128, rescale intercept -1024)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))
