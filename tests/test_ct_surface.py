"""Surface cleaning on real scan files (written by SimpleITK): noise specks, pin holes, a CT-table plate
outside the body and a body cut by the field of view; the anatomy's surfaces stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctvq.cli import main
from ctvq.ct.band import load_band
from ctvq.ct.io import CTImage, write_ct
from ctvq.ct.surface import SURFACE_DEFAULTS
from ctvq.ct.volume_file import load_windowed

SHAPE, SPACING = (80, 80, 40), (1.0, 1.0, 1.0)  # 80 x 80 x 40 mm: the cube (64, 1.25 mm) is cut in z
OUTER, FAT, HOLES = 28.0, 12.0, 19.5  # muscle cylinder, fat cylinder inside it (the anatomy), pin holes (mm)
TABLE_Y = (36.0, 39.0)  # a 3 mm plate 8 mm behind the body, across the whole field of view
SHIFT = 2.0  # 1 mm smoothing moves the muscle/air surface inward (iso 50 HU lies near muscle's 100 HU)


def _scan(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    r = np.hypot(x, y)
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[r <= OUTER] = 100.0  # muscle: inside the soft-tissue window's iso value (50 HU)
    hu[r <= FAT] = -100.0  # fat: outside it
    hu[(y >= TABLE_Y[0]) & (y < TABLE_Y[1])] = 300.0  # the table
    for cx, cy, cz in rng.integers((-3, -3, 4), (2, 2, 34), size=(12, 3)):  # specks in the fat
        hu[40 + cx:42 + cx, 40 + cy:42 + cy, cz:cz + 2] = 400.0
    for angle, cz in zip(rng.uniform(0, 2 * np.pi, 12), rng.integers(4, 34, 12), strict=True):  # pin holes
        cx, cy = (int(round(39.0 + HOLES * f(angle))) for f in (np.cos, np.sin))
        hu[cx:cx + 2, cy:cy + 2, cz:cz + 2] = -300.0
    hu += rng.normal(0.0, 8.0, SHAPE).astype(np.float32)
    write_ct(CTImage(hu=hu, spacing=SPACING, origin=(-40.0, -40.0, -20.0),
                     direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), source="synthetic"), path)
    return path


def _band(scan: Path, tmp: Path, *flags: str, window: str = "soft_tissue"
          ) -> tuple[np.ndarray, np.ndarray, Path]:
    windowed, band = tmp / f"w{len(flags)}.npz", tmp / f"b{len(flags)}.npz"
    assert main(["window", str(scan), "-o", str(windowed), "--window", window, "--resolution", "64",
                 *flags]) == 0
    assert main(["sdf", str(windowed), "-o", str(band)]) == 0
    field = load_band(band)
    volume = load_windowed(windowed)
    mm = (field.coords @ volume.affine[:3, :3].T + volume.affine[:3, 3]).astype(np.float64)
    return field.coords, mm, windowed


RAW = ("--smooth-mm", "0", "--min-island-mm3", "0", "--no-body-mask", "--pad", "air")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scan(tmp_path_factory.mktemp("surface") / "cut_body.nii.gz")


def test_defaults_drop_specks_holes_table_and_caps_and_keep_the_anatomy(scan: Path, tmp_path: Path) -> None:
    reach = 3 * 1.25 + 1.25  # band (3 voxels) plus one voxel, mm
    raw_coords, raw_mm, _ = _band(scan, tmp_path, *RAW)
    coords, mm, windowed = _band(scan, tmp_path)
    for points, cleaned in ((raw_mm, False), (mm, True)):
        r = np.hypot(points[:, 0], points[:, 1])
        near_anatomy = ((r >= OUTER - SHIFT - reach) & (r <= OUTER + reach)) | (np.abs(r - FAT) <= reach)
        specks = (r < 6.0) & (np.abs(points[:, 2]) < 15)
        holes = (np.abs(r - HOLES) < 1.5) & (np.abs(points[:, 2]) < 15)
        table = points[:, 1] > OUTER + reach
        caps = np.abs(points[:, 2]) > 20.0 - reach
        found = {"specks": specks.sum(), "holes": holes.sum(), "table": table.sum(),
                 "caps": (caps & ~near_anatomy).sum()}
        if cleaned:
            assert found == {"specks": 0, "holes": 0, "table": 0, "caps": 0}
            assert near_anatomy.all()
        else:
            assert all(n > 0 for n in found.values()), found  # the raw surface has every artefact
    volume = load_windowed(windowed)
    lo, hi = np.ceil(volume.scan_extent[0]), np.floor(volume.scan_extent[1])
    assert (coords >= lo).all() and (coords <= hi).all()  # nothing outside the scan is supervised
    assert ((raw_coords[:, 2] < lo[2]) | (raw_coords[:, 2] > hi[2])).sum() > 0  # the raw caps reach past it
    # the anatomy's two surfaces are present in every slice of the scan, right up to where it stops
    for z in range(int(lo[2]), int(hi[2]) + 1):
        r = np.hypot(*mm[coords[:, 2] == z][:, :2].T)
        assert (np.abs(r - OUTER + SHIFT / 2) < 1.5).any() and (np.abs(r - FAT) < 1.5).any(), z


def test_settings_are_recorded_in_the_windowed_and_band_files(scan: Path, tmp_path: Path) -> None:
    coords, _, windowed = _band(scan, tmp_path, "--smooth-mm", "0.7", "--min-island-mm3", "30")
    volume = load_windowed(windowed)
    assert (volume.surface.smooth_mm, volume.surface.min_island_mm3) == (0.7, 30.0)
    assert volume.surface.body_mask and volume.surface.pad == "edge"
    np.testing.assert_allclose(volume.scan_extent[:, 2], [15.5, 47.5])
    field = load_band(tmp_path / "b4.npz")
    assert field.surface == volume.surface
    np.testing.assert_array_equal(field.scan_extent, volume.scan_extent)


def test_phantom_anatomy_is_untouched_by_the_body_mask_and_islands(small_scan: Path, tmp_path: Path) -> None:
    """The synthetic chest has no table and little noise: every default but smoothing leaves its band."""
    for window in SURFACE_DEFAULTS:
        if SURFACE_DEFAULTS[window].smooth_mm:
            continue
        cleaned, _, _ = _band(small_scan, tmp_path, "--pad", "air", window=window)
        raw, _, _ = _band(small_scan, tmp_path, *RAW, window=window)
        kept = {tuple(c) for c in cleaned.tolist()}
        assert len(kept & {tuple(c) for c in raw.tolist()}) >= 0.98 * len(raw), window


@pytest.mark.parametrize(("flags", "message"), [
    (("--smooth-mm", "-1"), "--smooth-mm -1: must be >= 0 mm"),
    (("--min-island-mm3", "nan"), "--min-island-mm3 nan: must be >= 0"),
])
def test_bad_settings_are_refused_in_one_line(scan: Path, tmp_path: Path, flags: tuple[str, ...],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["window", str(scan), "-o", str(tmp_path / "w.npz"), "--window", "lung", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "w.npz").exists()
