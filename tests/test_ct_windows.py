import numpy as np
import pytest

from ctvq.ct.errors import CTInputError
from ctvq.ct.windows import WINDOWS, get_window


def test_registered_windows_have_the_standard_width_and_level() -> None:
    assert {n: (w.width, w.level) for n, w in WINDOWS.items()} == {
        "lung": (1500.0, -600.0), "bone": (1500.0, 300.0), "soft_tissue": (400.0, 50.0),
        "brain": (80.0, 35.0)}


def test_window_formula_clips_to_unit_range_and_puts_iso_at_the_level() -> None:
    w = get_window("brain")
    hu = np.array([-100.0, -5.0, 35.0, 55.0, 75.0, 500.0], dtype=np.float32)
    np.testing.assert_allclose(w.apply(hu), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    assert w.iso_hu() == 35.0
    assert w.iso_hu(0.25) == 15.0


def test_apply_in_place_reuses_the_buffer() -> None:
    hu = np.array([-600.0, 150.0], dtype=np.float32)
    out = get_window("lung").apply(hu, out=hu)
    assert out is hu
    np.testing.assert_allclose(hu, [0.5, 1.0])


def test_custom_window_needs_width_and_level() -> None:
    assert get_window("custom", 200, 100).iso_hu() == 100
    with pytest.raises(CTInputError, match="needs both --width and --level"):
        get_window("custom", 200, None)
    with pytest.raises(CTInputError, match="width must be > 0"):
        get_window("custom", 0, 10)


def test_unknown_window_lists_the_accepted_names() -> None:
    accepted = "accepted: lung, bone, soft_tissue, brain, custom"
    with pytest.raises(CTInputError, match=f"unknown window 'liver'; {accepted}"):
        get_window("liver")
    with pytest.raises(CTInputError, match="use 'custom'"):
        get_window("lung", 100, 10)
