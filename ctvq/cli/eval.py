"""The subcommands ``ctvq eval``, ``ctvq encode`` and ``ctvq decode`` (``ctvq.cli`` registers them).

Expected failures raise ``EXPECTED_ERRORS``; the CLI prints their first line and exits 2. A reconstruction
without a surface (a collapsed checkpoint) exits ``EXIT_NO_SURFACE`` = 3 (``DECODE_EPILOG``, ``EVAL_EPILOG``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ctvq.ct.errors import CTInputError
from ctvq.ct.sample import SampleFormatError
from ctvq.ct.splits import SPLITS
from ctvq.ct.volume_file import save_npz_atomic
from ctvq.eval.evaluate import run_evaluation
from ctvq.eval.loading import (
    EvalInputError,
    check_model_settings,
    load_model,
    load_settings,
)
from ctvq.eval.metrics import DEFAULT_POINTS
from ctvq.eval.surfaces import no_surface_reason, sparse_surface, write_ply
from ctvq.eval.tokens import decode_tokens, encode_sample, load_tokens, model_input, save_tokens
from ctvq.train.checkpoint import CheckpointError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (EvalInputError, CheckpointError, CTInputError,
                                                     SampleFormatError)
_SDF_KIND = "ctvq-decoded-sdf"
EXIT_NO_SURFACE = 3
"""No reconstructed surface: `ctvq decode` of such tokens, `ctvq eval` where every case collapsed."""
_LIKELY = ("the checkpoint has likely collapsed (look for 'WARNING: collapse:' in its training log) or the "
           "tokens come from another checkpoint")
EVAL_EPILOG = (f"Exit status {EXIT_NO_SURFACE} when no evaluated case has a reconstructed surface (a "
               "collapsed tokenizer that learned nothing), after every output is written; each such case is "
               "named on stderr and flagged in cases.csv (collapsed) and metrics.json (collapsed_cases). "
               "--allow-collapse exits 0 anyway.")
DECODE_EPILOG = (f"Exit status {EXIT_NO_SURFACE}, and no PLY written, when the decoded field has no surface "
                 "(every voxel on one side of sdf = 0, or no triangle): an empty mesh with exit 0 is easy to "
                 "miss in a pipeline and means the checkpoint collapsed or the tokens are not its own. "
                 "--sdf-out is still written (it is the evidence); --allow-empty writes the empty PLY and "
                 "exits 0.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, required=True,
                   help="model checkpoint of `ctvq train` (ckpts/final.pt)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help="the training config of the checkpoint (default: config.json of its run folder); "
                        "gives the window, resolution and band samples must have")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_config(p)
    p.add_argument("--data", type=Path, required=True, help="manifest CSV, folder of samples, or one sample")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="metrics.json (flat, for dvc metrics; val/..., train/..., test/... keys per split)")
    p.add_argument("--output-dir", type=Path,
                   help="cases.csv, figures/, meshes/, training_curves.* (default: the folder of -o)")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS,
                   help=f"surface points sampled per mesh for Chamfer/F-score (default {DEFAULT_POINTS})")
    p.add_argument("--seed", type=int, default=0, help="surface sampling seed (default 0)")
    p.add_argument("--windowed-dir", type=Path,
                   help="for samples made before they carried their own CT planes: the folder of windowed "
                        "volumes for the figures' background (default: ../windowed next to the samples, as "
                        "`ctvq demo` lays them out; without either the input SDF is shown)")
    p.add_argument("--train-log", type=Path, nargs="+", metavar="CSV",
                   help="metrics.csv of the training runs for the curves, in training order (stage 1, then "
                        "stage 2: one curve, steps continued; default: the checkpoint's own run's)")
    p.add_argument("--curves-csv", type=Path, metavar="CSV",
                   help="where the training curves' CSV goes (default: training_curves.csv in the output "
                        "folder; the workflow puts it in results/curves/ for `dvc plots show`)")
    p.add_argument("--split", nargs="+", choices=SPLITS, metavar="SPLIT",
                   help="evaluate only the manifest's cases of these splits (train, val, test; default: "
                        "every ok case, reported per split)")
    p.add_argument("--no-meshes", action="store_true", help="skip the PLY meshes")
    p.add_argument("--no-figures", action="store_true", help="skip the slice figures")
    p.add_argument("--allow-collapse", action="store_true",
                   help=f"exit 0 even when every case collapsed (default: exit {EXIT_NO_SURFACE})")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="decode in N^3 chunks (default: the config's chunk_size): the same output in less "
                        "memory; `ctvq plan` says which N fits")
    p.epilog = EVAL_EPILOG


def run_eval(args: argparse.Namespace) -> int:
    if args.points < 1:
        raise EvalInputError(f"--points {args.points}: must be >= 1")
    loaded = load_model(args.ckpt, args.device)
    if args.chunk_size is not None:
        loaded.decode_in_chunks(args.chunk_size)
    settings = load_settings(args.ckpt, args.config)
    check_model_settings(loaded, settings)
    out_dir = args.output_dir if args.output_dir is not None else args.output.parent
    summary = run_evaluation(loaded, settings, args.data, args.output, out_dir, points=args.points,
                             seed=args.seed, meshes=not args.no_meshes, figures=not args.no_figures,
                             windowed_dir=args.windowed_dir, train_logs=args.train_log or (),
                             curves_csv=args.curves_csv, splits=args.split)
    print(f"ctvq eval: wrote {args.output} ({summary['num_cases']} cases, headline split "
          f"{summary['eval_split']}) and {out_dir}/cases.csv", file=sys.stderr)
    return collapse_exit_code(summary, args.allow_collapse)


def collapse_exit_code(summary: dict, allow_collapse: bool) -> int:
    """``EXIT_NO_SURFACE`` when every evaluated case collapsed (a DAG should go red), else 0."""
    collapsed, total = summary.get("collapsed_cases") or 0, summary["num_cases"]
    if collapsed < total:
        return 0
    what = "warning" if allow_collapse else "error"
    hint = "" if allow_collapse else "; --allow-collapse exits 0"
    print(f"ctvq eval: {what}: all {total} evaluated cases collapsed (no reconstructed surface): the "
          f"tokenizer learned nothing; outputs were written{hint}", file=sys.stderr)
    return 0 if allow_collapse else EXIT_NO_SURFACE


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_config(p)
    p.add_argument("input", type=Path,
                   help="a preprocessed sample (.npz from `ctvq index`) or a raw CT scan (file or DICOM "
                        "folder), which is preprocessed with the checkpoint's window, resolution and band")
    p.add_argument("-o", "--output", type=Path, required=True, help="tokens .npz")
    p.add_argument("--case-id", help="case id of a raw scan (default: its file name)")


def run_encode(args: argparse.Namespace) -> int:
    loaded = load_model(args.ckpt, args.device)
    settings = load_settings(args.ckpt, args.config)
    check_model_settings(loaded, settings)
    tokens = encode_sample(loaded, model_input(settings, args.input, args.case_id))
    save_tokens(tokens, args.output)
    print(f"ctvq encode: {tokens.case_id}: {tokens.num_tokens} tokens (codebook {tokens.num_embeddings}) "
          f"-> {args.output}", file=sys.stderr)
    return 0


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("tokens", type=Path, help="tokens .npz from `ctvq encode`")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="reconstructed surface (.ply, patient mm)")
    p.add_argument("--sdf-out", type=Path,
                   help="also write the decoded sparse SDF (.npz: coords, sdf, affine)")
    p.add_argument("--allow-empty", action="store_true",
                   help=f"write the PLY and exit 0 even when it has no triangle (default: exit "
                        f"{EXIT_NO_SURFACE})")
    p.add_argument("--other-codebook", action="store_true",
                   help="decode although the tokens were encoded with another codebook (refused by default: "
                        "their indices mean other shapes under this checkpoint)")
    p.epilog = DECODE_EPILOG


def run_decode(args: argparse.Namespace) -> int:
    """Tokens -> PLY (and SDF); a field with no surface exits ``EXIT_NO_SURFACE`` (see ``DECODE_EPILOG``)."""
    loaded = load_model(args.ckpt, args.device)
    tokens = load_tokens(args.tokens)
    if not tokens.codebook_sha256:
        print(f"ctvq decode: warning: {args.tokens} does not name its codebook (written by an older ctvq): "
              "make sure it was encoded with this checkpoint", file=sys.stderr)
    coords, sdf = decode_tokens(loaded, tokens, what=str(args.tokens), other_codebook=args.other_codebook)
    mesh = sparse_surface(coords, sdf, tokens.affine)
    reason = no_surface_reason(sdf, mesh.num_faces)
    if reason is None or args.allow_empty:
        write_ply(mesh, args.output)
    if args.sdf_out is not None:
        save_npz_atomic(args.sdf_out, {
            "kind": np.asarray(_SDF_KIND), "format_version": np.asarray(1),
            "coords": coords.astype(np.int16), "sdf": sdf.astype(np.float32),
            "affine": np.asarray(tokens.affine, dtype=np.float64),
            "resolution": np.asarray(tokens.resolution),
            "band": np.asarray(tokens.band), "case_id": np.asarray(tokens.case_id),
        }, level=6)
    if reason is not None and not args.allow_empty:
        print(f"ctvq decode: error: {tokens.case_id}: the decoded field has no surface: {reason}; {_LIKELY}; "
              f"{args.output} not written (--allow-empty writes the empty mesh)", file=sys.stderr)
        return EXIT_NO_SURFACE
    print(f"ctvq decode: {tokens.case_id}: {coords.shape[0]} voxels, {mesh.num_faces} triangles -> "
          f"{args.output}", file=sys.stderr)
    return 0
