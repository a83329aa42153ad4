"""The CT preprocessing steps as whole functions: phantom, window, sdf, index.

Each ``run_*`` is one step (read, compute, write atomically, log): what the ``ctvq`` subcommands, the demo
and the benchmarks call. Progress goes to stderr, one line per stage, with elapsed seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ctvq.ct.band import band_and_inside, default_band, dense_field, load_band, save_band
from ctvq.ct.case_id import check_case_id
from ctvq.ct.errors import CTInputError, warnings_as_lines
from ctvq.ct.index import build_index
from ctvq.ct.io import write_ct, write_dicom_series
from ctvq.ct.phantom import chest_phantom
from ctvq.ct.pipeline import build_band, default_case_id, load_windowed, window_scan
from ctvq.ct.sample import save_sample
from ctvq.ct.surface import SurfaceSettings, surface_settings
from ctvq.ct.volume_file import WindowedVolume, save_windowed
from ctvq.ct.windows import DEFAULT_ISO, get_window


class _Clock:
    """Logs ``ctvq <step>: <case>: <what> (<elapsed> s)`` to stderr."""

    def __init__(self, step: str, case: str, quiet: bool = False) -> None:
        self.step, self.case, self.quiet, self.start = step, case, quiet, time.perf_counter()

    def log(self, what: str) -> None:
        if not self.quiet:
            print(f"ctvq {self.step}: {self.case}: {what} ({time.perf_counter() - self.start:.2f} s)",
                  file=sys.stderr, flush=True)


def run_phantom(output: Path, seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                noise: float, dicom: bool = False, quiet: bool = False) -> None:
    clock = _Clock("phantom", output.name, quiet)
    try:
        ct = chest_phantom(shape, spacing, seed=seed, noise_hu=noise)
    except ValueError as exc:
        raise CTInputError(f"{output}: {exc}") from exc
    clock.log(f"generated {'x'.join(map(str, shape))} at {'x'.join(f'{s:g}' for s in spacing)} mm")
    if dicom:
        write_dicom_series(ct, output)
    else:
        write_ct(ct, output)
    clock.log(f"wrote {output}")


def _checked_case_id(case_id: str) -> str:
    try:
        return check_case_id(case_id, "--case-id")
    except ValueError as exc:
        raise CTInputError(str(exc)) from None


def run_window(source: Path, output: Path, window_name: str, width: float | None, level: float | None,
               resolution: int, case_id: str | None, quiet: bool = False,
               surface: SurfaceSettings | None = None, preview: Path | None = None,
               nifti: Path | None = None, series_uid: str | None = None) -> None:
    window = get_window(window_name, width, level)
    surface = surface or surface_settings(window.name)
    check_picture_paths(preview, nifti)
    case = default_case_id(source) if case_id is None else _checked_case_id(case_id)
    clock = _Clock("window", case, quiet)
    with warnings_as_lines("ctvq window"):
        volume = window_scan(source, window, resolution, case, surface, series_uid)
    clock.log(f"read, resampled to {resolution}^3 and windowed ({window.name} W={window.width:g} "
              f"L={window.level:g}; surface: {surface.describe()})")
    save_windowed(volume, output)
    clock.log(f"wrote {output}")
    write_window_pictures(volume, preview, nifti, clock)


def check_picture_paths(preview: Path | None, nifti: Path | None) -> None:
    """Refuse a picture name of the wrong kind before any work (the suffix picks the writer)."""
    from ctvq.ct.nifti import check_nifti_path

    if preview is not None and preview.suffix.lower() != ".png":
        raise CTInputError(f"--preview {preview}: not a PNG name; end it with .png")
    if nifti is not None:
        check_nifti_path(nifti)


def volume_step(volume: WindowedVolume) -> float:
    return float(sum(v * v for v in volume.affine[:3, 0]) ** 0.5)


def write_window_pictures(volume: WindowedVolume, preview: Path | None, nifti: Path | None,
                          clock: _Clock) -> None:
    """The optional outputs of ``ctvq window`` for people: a PNG of three slices, the cube as NIfTI."""
    if preview is not None:
        from ctvq.ct.preview import save_window_preview  # matplotlib: only when a picture is asked for

        w = volume.window
        save_window_preview(volume.values, volume.affine, preview,
                            f"{volume.case_id}  {w.name} W={w.width:g} L={w.level:g}  {volume.resolution}^3 "
                            f"at {volume_step(volume):.3g} mm  surface: "
                            f"{volume.surface.describe()}  (yellow: iso {DEFAULT_ISO:g})",
                            iso_value=DEFAULT_ISO)
        clock.log(f"wrote {preview}")
    if nifti is not None:
        from ctvq.ct.nifti import write_cube_nifti

        write_cube_nifti(volume.values, volume.affine, nifti)
        clock.log(f"wrote {nifti} (windowed values in [0, 1])")


def run_sdf(source: Path, output: Path, band: float | None, iso: float, quiet: bool = False,
            nifti: Path | None = None) -> None:
    """``band`` None: the window's default (``ctvq.ct.band.DEFAULT_BANDS``)."""
    check_picture_paths(None, nifti)
    volume = load_windowed(source)
    band = default_band(volume.window.name) if band is None else band
    clock = _Clock("sdf", volume.case_id, quiet)
    if nifti is None:
        field = build_band(volume, band=band, iso_value=iso)
    else:
        field, inside = band_and_inside(volume, band=band, iso_value=iso)
    clock.log(f"narrow band |d| <= {band:g}: {field.coords.shape[0]} voxels, "
              f"{field.latent_coords.shape[0]} latent cells ({field.islands_removed} islands removed, "
              f"{field.holes_filled} holes filled)")
    save_band(field, output)
    clock.log(f"wrote {output}")
    if nifti is not None:
        from ctvq.ct.nifti import write_cube_nifti

        del volume
        write_cube_nifti(dense_field(field, inside), field.affine, nifti)
        clock.log(f"wrote {nifti} (distance / band in the band, -1 inside and +1 outside beyond it)")


def run_index(source: Path, output: Path, quiet: bool = False) -> None:
    field = load_band(source)
    clock = _Clock("index", field.case_id, quiet)
    sample = build_index(field)
    save_sample(sample, output)
    clock.log(f"wrote {output} ({sample.num_points} points, {sample.num_latent} latent cells)")


