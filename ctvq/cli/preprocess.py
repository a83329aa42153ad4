"""The preprocessing subcommands: phantom, discover, window, sdf, index, manifest, demo.

``configure_<step>`` adds a subcommand's arguments and ``<step>_command`` runs it, calling the step functions
of ``ctvq.ct.steps``; ``ctvq.cli`` lists them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctvq.ct.band import DEFAULT_BANDS
from ctvq.ct.errors import CTInputError
from ctvq.ct.failure import CaseFailure, one_line, read_failure, write_failure
from ctvq.ct.io import FILE_SUFFIXES
from ctvq.ct.pipeline import default_case_id
from ctvq.ct.splits import DEFAULT_FRACTIONS, SPLITS, SplitError, SplitRule, parse_fractions
from ctvq.ct.steps import check_picture_paths, run_index, run_phantom, run_sdf, run_window
from ctvq.ct.surface import PADS, SURFACE_DEFAULTS, surface_settings
from ctvq.ct.windows import CUSTOM, DEFAULT_ISO, WINDOWS


def configure_phantom(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True,
                   help=f"scan file ({', '.join(FILE_SUFFIXES[:-1])}) or, with --dicom, a new folder")
    p.add_argument("--seed", type=int, default=0, help="shape variation seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=(192, 192, 96), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 2.0), metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (default 0.7 0.7 2.0)")
    p.add_argument("--noise", type=float, default=12.0, help="Gaussian noise sigma in HU (default 12)")
    p.add_argument("--dicom", action="store_true", help="write a DICOM series (one file per slice)")


def configure_window(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="scan file (NIfTI, NRRD, MHA/MHD) or DICOM series folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="windowed volume (.npz)")
    p.add_argument("--window", required=True, choices=[*WINDOWS, CUSTOM])
    p.add_argument("--width", type=float, help="window width in HU (custom only)")
    p.add_argument("--level", type=float, help="window level in HU (custom only)")
    p.add_argument("--resolution", type=int, default=512,
                   help="cube side in voxels: 256, 512, 1024 or a multiple of 8 >= 64 (default 512)")
    p.add_argument("--case-id", help="case id (default: input file name without suffix)")
    defaults = "; ".join(f"{name}: {s.smooth_mm:g} mm, {s.min_island_mm3:g} mm³"
                         for name, s in SURFACE_DEFAULTS.items())
    p.add_argument("--smooth-mm", type=float, metavar="SIGMA",
                   help=f"Gaussian sigma (mm) on the scan before resampling; 0: none (default per window: "
                        f"{defaults} for smoothing and islands)")
    p.add_argument("--min-island-mm3", type=float, metavar="MM3",
                   help="inside islands and enclosed holes smaller than this are removed by `ctvq sdf` at "
                        "its iso value; 0: keep all (default per window, above)")
    p.add_argument("--body-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="drop objects outside the body (CT table, headrest) so they leave no surface "
                        "(default: on)")
    p.add_argument("--pad", choices=PADS,
                   help="fill outside the scan by repeating its border (edge: a cut body runs straight on, "
                        "and the band keeps only voxels inside the scan) or with air (caps cut bodies) "
                        "(default: edge)")
    p.add_argument("--preview", type=Path, metavar="PNG",
                   help="also write a picture: axial, coronal and sagittal slices through the cube's centre "
                        "(radiological orientation, mm axes), the iso level in yellow; with --record-failure "
                        "a failed case gets a picture naming the failure")
    p.add_argument("--nifti", type=Path, metavar="NII_GZ",
                   help="also write the windowed cube as NIfTI (.nii.gz) with its patient geometry, to open "
                        "in 3D Slicer over the scan")
    p.add_argument("--series", metavar="UID", dest="series_uid",
                   help="the DICOM series to read when the input folder holds several (see `ctvq discover`)")
    _add_record_failure(p)


_RECORD_FAILURE_HELP = (
    "when the case's input is unusable (damaged scan, failure record of an earlier step), write a failure "
    "record at -o and exit 0, so `ctvq manifest` lists the case as failed and the others go on (the "
    "workflow's setting); default: fail with exit status 2")


def _add_record_failure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record-failure", action="store_true", help=_RECORD_FAILURE_HELP)


def _passed_on(args: argparse.Namespace, step: str) -> bool:
    """Whether the input is an earlier step's failure record, written on to ``args.output`` (with
    ``--record-failure``; without it the record is refused)."""
    earlier = read_failure(args.input)
    if earlier is None:
        return False
    if not args.record_failure:
        raise CTInputError(f"{args.input}: failure record of case {earlier.case_id!r} ({earlier.status}); "
                           "nothing to process (fix the scan and rerun its steps)")
    write_failure(earlier, args.output)
    print(f"ctvq {step}: {earlier.case_id}: passed on the failure record ({earlier.status})",
          file=sys.stderr, flush=True)
    return True


@contextmanager
def _failures_recorded(args: argparse.Namespace, step: str, case_id: str, window: str = "",
                       picture: Path | None = None) -> Iterator[None]:
    """With ``--record-failure`` a CTInputError raised inside becomes a failure record at ``args.output``
    (and, given a ``picture`` path, a picture saying so in place of the preview); without it the error
    goes on (exit status 2)."""
    if not args.record_failure:
        yield
        return
    try:
        yield
    except CTInputError as exc:
        failure = CaseFailure(case_id, str(args.input), step, one_line(exc), window)
        write_failure(failure, args.output)
        print(f"ctvq {step}: {case_id}: {failure.status}; recorded in {args.output}", file=sys.stderr,
              flush=True)
        if picture is not None:
            from ctvq.ct.preview import save_failure_preview  # matplotlib: only when a picture is asked for

            save_failure_preview(picture, case_id, f"{window} {failure.status}".strip())


def configure_sdf(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="windowed volume from `ctvq window`")
    p.add_argument("-o", "--output", type=Path, required=True, help="band file (.npz)")
    p.add_argument("--band", type=float, default=None,
                   help="band half-width in voxels (default: the window's, "
                        + ", ".join(f"{w} {b:g}" for w, b in DEFAULT_BANDS.items()) + "; custom 3)")
    p.add_argument("--iso", type=float, default=DEFAULT_ISO,
                   help="iso value on the windowed scale (default 0.5)")
    p.add_argument("--nifti", type=Path, metavar="NII_GZ",
                   help="also write the field as a dense NIfTI (.nii.gz) with the cube's geometry, for 3D "
                        "Slicer: distance / band in the band, -1 inside and +1 outside beyond it")
    _add_record_failure(p)


def configure_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="band file from `ctvq sdf`")
    p.add_argument("-o", "--output", type=Path, required=True, help="training sample (.npz)")
    _add_record_failure(p)


def configure_manifest(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", type=Path, nargs="+", help="training samples from `ctvq index`")
    p.add_argument("-o", "--output", type=Path, required=True, help="manifest (.csv)")
    p.add_argument("--min-points", type=int, default=100, help="cases with fewer band voxels are filtered")
    default = ",".join(f"{k}={v:g}" for k, v in DEFAULT_FRACTIONS.items())
    p.add_argument("--split", metavar="FRACTIONS",
                   help=f"train/val/test fractions summing to 1 (default {default}); each case's split comes "
                        "from a seeded hash of its id, so it stays put when the cohort grows; with >= 2 ok "
                        "cases an empty val (or test) gets one train case")
    p.add_argument("--split-seed", type=int, metavar="N", help="seed of the split hash (default 0)")
    p.add_argument("--split-file", type=Path, metavar="CSV",
                   help="CSV with columns case_id,split (train/val/test) to use instead of the hash; every "
                        "manifest case must be listed")


def split_rule(args: argparse.Namespace) -> SplitRule:
    """The split options as a rule; a split file excludes the hash options (it replaces the hash)."""
    if args.split_file is not None:
        given = [o for o, v in (("--split", args.split), ("--split-seed", args.split_seed)) if v is not None]
        if given:
            raise SplitError(f"{' and '.join(given)} with --split-file: the file gives every case's split; "
                             "drop one of them")
        return SplitRule(file=args.split_file)
    fractions = parse_fractions(args.split) if args.split is not None else dict(DEFAULT_FRACTIONS)
    return SplitRule(fractions=fractions, seed=args.split_seed if args.split_seed is not None else 0)


def manifest_command(args: argparse.Namespace) -> int:
    from ctvq.ct.manifest import manifest_table, write_manifest  # pandas: only the manifest step needs it

    table = manifest_table(args.samples, args.output.parent, args.min_points, split_rule(args))
    write_manifest(table, args.output)
    ok = table["status"] == "ok"
    failed = table["status"].str.startswith("failed:")
    counts = ", ".join(f"{s} {int((ok & (table['split'] == s)).sum())}" for s in SPLITS)
    for row in table[failed].itertuples():
        print(f"ctvq manifest: warning: case {row.case_id} {row.status}", file=sys.stderr)
    print(f"ctvq manifest: wrote {args.output} ({int(ok.sum())} ok, {int((~ok & ~failed).sum())} filtered, "
          f"{int(failed.sum())} failed; ok cases by "
          f"split: {counts})", file=sys.stderr)
    return 0


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--cases", type=int, default=3, help="number of phantom cases (seeds 0..N-1)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--windows", nargs="+", default=["lung", "bone"], choices=list(WINDOWS))
    p.add_argument("--band", type=float, default=None, help="band half-width in voxels (default: per window, "
                   "as ctvq sdf)")
    p.add_argument("--min-points", type=int, default=100)


def demo_command(args: argparse.Namespace) -> int:
    from ctvq.ct.demo import run_demo

    run_demo(args.output_dir, args.cases, args.resolution, args.windows, args.band, args.min_points)
    return 0


def phantom_command(a: argparse.Namespace) -> int:
    run_phantom(a.output, a.seed, tuple(a.shape), tuple(a.spacing), a.noise, a.dicom)
    return 0


def _not_the_input(a: argparse.Namespace) -> None:
    """``-o`` naming the step's own input would replace the only copy of it with the result."""
    source, target = Path(a.input), Path(a.output)
    same = source.resolve() == target.resolve()
    if not same and source.exists() and target.exists():
        same = os.path.samefile(source, target)
    if same:
        raise CTInputError(f"{target}: -o names the input itself; write the result to another file")


def window_command(a: argparse.Namespace) -> int:
    _not_the_input(a)
    surface = surface_settings(a.window, a.smooth_mm, a.min_island_mm3, a.body_mask, a.pad, cli=True)
    check_picture_paths(a.preview, a.nifti)  # a usage error, never recorded as the case's failure
    with _failures_recorded(a, "window", a.case_id or default_case_id(a.input), a.window, a.preview):
        run_window(a.input, a.output, a.window, a.width, a.level, a.resolution, a.case_id, surface=surface,
                   preview=a.preview, nifti=a.nifti, series_uid=a.series_uid)
    return 0


def sdf_command(a: argparse.Namespace) -> int:
    _not_the_input(a)
    if not _passed_on(a, "sdf"):
        with _failures_recorded(a, "sdf", default_case_id(a.input)):
            run_sdf(a.input, a.output, a.band, a.iso, nifti=a.nifti)
    return 0


def index_command(a: argparse.Namespace) -> int:
    _not_the_input(a)
    if not _passed_on(a, "index"):
        with _failures_recorded(a, "index", default_case_id(a.input)):
            run_index(a.input, a.output)
    return 0


def configure_discover(p: argparse.ArgumentParser) -> None:
    p.add_argument("scan_dir", type=Path, help="folder of scan files and DICOM series, at any depth")
    p.add_argument("--json", action="store_true", help="print {cases: [...], skipped: [...]} as JSON")


def discover_command(a: argparse.Namespace) -> int:
    """What `inputs.scan_dir` would give the workflow, without running anything."""
    import json
    from dataclasses import asdict

    from ctvq.ct.discover import discover_scans

    found = discover_scans(a.scan_dir)
    if a.json:
        print(json.dumps({"cases": [asdict(c) for c in found.cases],
                          "skipped": [asdict(s) for s in found.skipped]}, indent=1))
        return 0
    for case in found.cases:
        series = f" (series {case.series_uid})" if case.series_uid else ""
        print(f"{case.case_id}\t{case.kind}\t{case.path}{series}")
    for skipped in found.skipped:
        print(f"skipped\t{skipped.path}: {skipped.reason}")
    print(f"ctvq discover: {len(found.cases)} case(s), {len(found.skipped)} skipped", file=sys.stderr)
    return 0
