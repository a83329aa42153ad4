"""Memory requests of the preprocessing steps: measured peaks at 1024 scaled by voxel count, with headroom."""

from __future__ import annotations

import pytest

from ctvq.ct.resources import FLOOR_MB, HEADROOM, PEAK_GIB_AT_1024, preprocess_mem_mb


@pytest.mark.parametrize("step", sorted(PEAK_GIB_AT_1024))
def test_request_covers_the_measured_peak_with_headroom_at_1024(step: str) -> None:
    request = preprocess_mem_mb(step, 1024)
    assert request >= HEADROOM * PEAK_GIB_AT_1024[step] * 1024
    assert request % 500 == 0


def test_small_resolutions_get_the_floor_and_requests_grow_with_the_cube() -> None:
    assert {preprocess_mem_mb(s, r) for s in PEAK_GIB_AT_1024 for r in (64, 256, 512)} == {FLOOR_MB}
    assert preprocess_mem_mb("sdf", 1024) > 3 * FLOOR_MB  # the old fixed 8 GB request would be killed
    # 8x the voxels, 8x the request, up to the 500 MB rounding of each
    assert preprocess_mem_mb("sdf", 2048) == pytest.approx(8 * preprocess_mem_mb("sdf", 1024), rel=0.02)
    requests = [preprocess_mem_mb("window", r) for r in range(512, 2049, 64)]
    assert requests == sorted(requests)


def test_unknown_step_and_bad_resolution_are_refused() -> None:
    with pytest.raises(ValueError, match="known steps: window, sdf, index"):
        preprocess_mem_mb("train", 512)
    with pytest.raises(ValueError, match="resolution=0"):
        preprocess_mem_mb("sdf", 0)


def test_runtime_requests_scale_with_voxels_and_have_a_floor() -> None:
    from ctvq.ct.resources import FLOOR_MINUTES, SECONDS_AT_1024, preprocess_runtime_minutes

    assert {preprocess_runtime_minutes(s, 256) for s in SECONDS_AT_1024} == {FLOOR_MINUTES}
    assert preprocess_runtime_minutes("sdf", 2048) > preprocess_runtime_minutes("sdf", 1024) >= FLOOR_MINUTES
    assert preprocess_runtime_minutes("sdf", 2048) >= 8 * 4 * 38.6 / 60 - 1  # 8x the voxels, 4x headroom
    with pytest.raises(ValueError, match="known steps"):
        preprocess_runtime_minutes("train", 512)
