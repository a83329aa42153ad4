import numpy as np

from ctvq.ct.io import check_hu
from ctvq.ct.phantom import chest_phantom
from ctvq.ct.windows import WINDOWS


def test_phantom_is_seeded_and_varies_with_the_seed() -> None:
    a = chest_phantom((64, 64, 24), seed=5)
    b = chest_phantom((64, 64, 24), seed=5)
    c = chest_phantom((64, 64, 24), seed=6)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert np.mean(np.abs(a.hu - c.hu) > 100) > 0.01


def test_phantom_is_ct_in_hu_with_anisotropic_spacing() -> None:
    ct = chest_phantom((128, 128, 64), spacing=(0.7, 0.7, 2.0), seed=0)
    assert ct.hu.shape == (128, 128, 64) and ct.hu.dtype == np.float32
    assert ct.spacing == (0.7, 0.7, 2.0)
    check_hu(ct.hu, "phantom")
    assert np.median(ct.hu[:4, :4, :]) < -950  # air in the corners


def test_every_window_has_a_surface_made_of_tissue_not_just_noise() -> None:
    ct = chest_phantom((128, 128, 64), seed=1, noise_hu=0.0)
    for window in WINDOWS.values():
        inside = ct.hu > window.iso_hu()
        assert 0.002 < inside.mean() < 0.9, window.name
    lungs = ct.hu < -700
    body = ct.hu > -300
    assert lungs[40:90, 30:100, 20:44].mean() > 0.3  # lungs inside the body
    assert body.mean() > 0.2
    assert (ct.hu > 600).sum() > 500  # ribs, spine and sternum for the bone window
