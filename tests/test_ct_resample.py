import numpy as np
import pytest

from ctvq.ct.errors import CTInputError
from ctvq.ct.io import AIR_HU, CTImage
from ctvq.ct.resample import check_resolution, resample_to_cube


def _ball_scan(direction: tuple[float, ...]) -> tuple[CTImage, np.ndarray]:
    """A 600 HU ball in air on an anisotropic grid; returns the scan and the ball centre in mm."""
    shape, spacing, origin = (60, 40, 20), (0.9, 1.1, 2.5), (10.0, -20.0, 35.0)
    centre_index = np.array([35.0, 18.0, 8.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    radius_mm = 9.0
    dist = np.linalg.norm((grid - centre_index) * np.asarray(spacing), axis=-1)
    hu = np.where(dist < radius_mm, 600.0, -1000.0).astype(np.float32)
    ct = CTImage(hu=hu, spacing=spacing, origin=origin, direction=direction, source="ball")
    d = np.asarray(direction).reshape(3, 3)
    return ct, np.asarray(origin) + d @ (centre_index * np.asarray(spacing))


@pytest.mark.parametrize("direction", [
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),  # rotated 90 degrees about z
])
def test_affine_maps_resampled_voxels_to_patient_millimetres(direction: tuple[float, ...]) -> None:
    ct, centre_mm = _ball_scan(direction)
    cube, affine = resample_to_cube(ct, 64)
    assert cube.shape == (64, 64, 64) and cube.dtype == np.float32
    step = ct.shape[0] * ct.spacing[0] / 64  # x is the longest physical axis (54 mm)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), step, rtol=1e-9)
    voxels = np.argwhere(cube > -200)
    found_mm = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
    np.testing.assert_allclose(found_mm, centre_mm, atol=step)


def test_longest_axis_spans_the_cube_and_the_rest_is_air_padding() -> None:
    ct = CTImage(hu=np.full((80, 40, 10), 40.0, np.float32), spacing=(0.5, 0.5, 2.0), origin=(0, 0, 0),
                 direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), source="slab")
    cube, _ = resample_to_cube(ct, 64)
    tissue = cube > -500
    assert tissue[:, 32, 32].sum() == 64  # x: 40 mm over the whole cube
    assert 30 <= tissue[32, :, 32].sum() <= 34  # y: 20 mm, centred
    assert 30 <= tissue[32, 32, :].sum() <= 34  # z: 20 mm, centred
    assert cube[32, 0, 32] == AIR_HU and cube[32, 32, 0] == AIR_HU


@pytest.mark.parametrize("resolution", [63, 32, 100, 0])
def test_resolution_must_be_a_multiple_of_8_from_64(resolution: int) -> None:
    with pytest.raises(CTInputError, match=f"resolution {resolution}"):
        check_resolution(resolution)
    check_resolution(72)
    check_resolution(512)
