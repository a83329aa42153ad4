import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import marching_cubes

from ctvq.ct.errors import CTInputError
from ctvq.ct.io import CTImage
from ctvq.ct.pipeline import build_sample, window_image
from ctvq.ct.preview import dense_sdf
from ctvq.ct.resample import resample_to_cube
from ctvq.ct.sdf import interface_distances, narrow_band_sdf
from ctvq.ct.surface import RAW
from ctvq.ct.windows import get_window

BAND = 3.0


def _sphere(n: int = 48, radius: float = 13.3) -> tuple[np.ndarray, np.ndarray]:
    """A windowed volume whose linear interpolation has exactly a sphere at iso 0.5, and its true SDF."""
    grid = np.indices((n, n, n), dtype=np.float64) - (n / 2 - 0.37)
    true = np.sqrt((grid**2).sum(axis=0)) - radius
    return np.clip(0.5 - 0.1 * true, 0.0, 1.0).astype(np.float32), true


def _flat_sdf(volume: np.ndarray, iso: float, band: float) -> tuple[np.ndarray, np.ndarray]:
    coords, signed = narrow_band_sdf(volume, iso, band)
    return np.ravel_multi_index(coords.T, volume.shape), signed


def _dense_reference(volume: np.ndarray, iso: float) -> np.ndarray:
    """Brute force: the same discrete problem (interface seeds, upwind Eikonal update) solved by float64
    Jacobi iteration over EVERY voxel of the grid until nothing changes; unsigned."""
    inside = volume > iso
    seeds, phi0 = interface_distances(volume, inside, iso)
    d = np.full(volume.shape, np.inf)
    d.ravel()[seeds] = phi0
    fixed = np.zeros(volume.shape, bool)
    fixed.ravel()[seeds] = True
    for _ in range(500):
        p = np.pad(d, 1, constant_values=np.inf)
        m = np.sort(np.stack([np.minimum(p[:-2, 1:-1, 1:-1], p[2:, 1:-1, 1:-1]),
                              np.minimum(p[1:-1, :-2, 1:-1], p[1:-1, 2:, 1:-1]),
                              np.minimum(p[1:-1, 1:-1, :-2], p[1:-1, 1:-1, 2:])]), axis=0)
        with np.errstate(invalid="ignore"):
            new = m[0] + 1
            two = (m[0] + m[1] + np.sqrt(np.maximum(2 - (m[0] - m[1]) ** 2, 0))) / 2
            new = np.where(new > m[1], two, new)
            s, q = m.sum(axis=0), (m**2).sum(axis=0)
            three = (s + np.sqrt(np.maximum(s * s - 3 * (q - 1), 0))) / 3
            new = np.where(new > m[2], three, new)
        new = np.where(fixed, d, np.fmin(d, new))
        if np.array_equal(new, d):
            return d
        d = new
    raise AssertionError("reference did not converge")


def test_band_membership_and_values_equal_a_full_grid_solution() -> None:
    volume, _ = _sphere()
    flat, signed = _flat_sdf(volume, 0.5, BAND)
    reference = _dense_reference(volume, 0.5).ravel()
    ref_band = np.flatnonzero(reference <= BAND)
    ties = np.flatnonzero(np.abs(reference - BAND) < 1e-4)
    assert np.setdiff1d(np.setxor1d(ref_band, flat), ties).size == 0
    np.testing.assert_allclose(np.abs(signed), reference[flat], atol=2e-5)


def test_band_membership_on_a_phantom_crop_equals_the_full_grid_solution(small_ct: CTImage) -> None:
    cube, _ = resample_to_cube(small_ct, 64)
    volume = get_window("bone").apply(cube)[8:56, 8:56, 8:56]
    flat, signed = _flat_sdf(volume, 0.5, BAND)
    reference = _dense_reference(volume, 0.5).ravel()
    ties = np.flatnonzero(np.abs(reference - BAND) < 1e-4)
    assert np.setdiff1d(np.setxor1d(np.flatnonzero(reference <= BAND), flat), ties).size == 0
    np.testing.assert_allclose(np.abs(signed), reference[flat], atol=2e-5)


def test_sphere_distances_are_sub_voxel_and_beat_the_full_grid_edt() -> None:
    volume, true = _sphere()
    flat, signed = _flat_sdf(volume, 0.5, BAND)
    error = np.abs(signed - true.ravel()[flat])
    assert np.median(error) < 0.06 and error.max() < 0.45
    inside = volume > 0.5
    edt = ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)
    assert np.median(error) < 0.5 * np.median(np.abs(edt.ravel()[flat] - true.ravel()[flat]))
    band_true = np.abs(true) <= BAND - 0.5
    assert band_true.ravel()[flat].sum() == band_true.sum()  # nothing well inside the band is missed


def test_sign_agrees_with_the_hu_threshold_at_every_band_voxel(small_ct: CTImage) -> None:
    for name in ("lung", "bone", "soft_tissue", "brain"):
        window = get_window(name)
        sample = build_sample(window_image(small_ct, window, 64, "c", RAW))  # raw: no islands flipped
        hu, _ = resample_to_cube(small_ct, 64)
        c = sample.coords.astype(np.intp)
        above = hu[c[:, 0], c[:, 1], c[:, 2]] > window.iso_hu()
        assert np.array_equal(sample.sdf < 0, above), name
        assert np.abs(sample.sdf).max() <= 1.0


def test_zero_level_matches_marching_cubes_of_the_resampled_hu(small_ct: CTImage) -> None:
    window = get_window("lung")
    sample = build_sample(window_image(small_ct, window, 96, "c", RAW))  # raw: the cut caps are kept
    hu, _ = resample_to_cube(small_ct, 96)
    verts, _, _, _ = marching_cubes(hu, level=window.iso_hu())
    base = np.floor(verts).astype(np.intp)
    frac = verts - base
    on_edge = (frac > 1e-4).sum(axis=1) == 1
    axis = np.argmax(frac[on_edge], axis=1)
    p = base[on_edge]
    q = p + np.eye(3, dtype=np.intp)[axis]
    grid = dense_sdf(sample)
    sp, sq = grid[p[:, 0], p[:, 1], p[:, 2]], grid[q[:, 0], q[:, 1], q[:, 2]]
    assert np.isfinite(sp).all() and np.isfinite(sq).all()  # both ends of every crossing edge are in the band
    assert (np.sign(sp) != np.sign(sq)).all()
    zero = sp / (sp - sq)
    offset = np.abs(zero - frac[on_edge][np.arange(axis.size), axis])
    assert axis.size > 1000
    assert np.median(offset) < 0.25
    assert np.percentile(offset, 95) < 0.25


def test_memory_layout_does_not_change_the_result() -> None:
    volume, _ = _sphere(40, 11.2)
    volume = volume[:, ::-1, :] * np.linspace(0.9, 1.1, 40, dtype=np.float32)[None, None, :]  # anisotropic
    c_order = np.ascontiguousarray(volume)
    f_order = np.asfortranarray(volume)
    flat_c, d_c = _flat_sdf(c_order, 0.5, BAND)
    flat_f, d_f = _flat_sdf(f_order, 0.5, BAND)
    order_c, order_f = np.argsort(flat_c), np.argsort(flat_f)
    np.testing.assert_array_equal(flat_c[order_c], flat_f[order_f])
    np.testing.assert_allclose(d_c[order_c], d_f[order_f], atol=1e-5)


def test_no_iso_surface_is_an_input_error() -> None:
    with pytest.raises(CTInputError, match="no iso-surface"):
        narrow_band_sdf(np.full((16, 16, 16), 0.2, np.float32), 0.5, BAND)


def test_band_width_is_configurable() -> None:
    volume, _ = _sphere()
    flat1, d1 = _flat_sdf(volume, 0.5, 1.5)
    flat3, d3 = _flat_sdf(volume, 0.5, 3.0)
    assert np.abs(d1).max() <= 1.5 < np.abs(d3).max()
    assert np.isin(flat1, flat3).all()
