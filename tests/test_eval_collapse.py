"""`ctvq decode` and `ctvq eval` on a collapsed checkpoint: loud, non-zero, nothing misleading written.

The collapsed model is what a bone run with the plain mean loss ends as: every decoded sdf on the outside,
made here exactly by a decoder output bias of +5 (tanh(5) = 0.9999 at every voxel).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import sample_from_distance, spheres_distance

from ctvq.cli import main
from ctvq.cli.eval import EXIT_NO_SURFACE, collapse_exit_code
from ctvq.ct.sample import SparseSample, save_sample
from ctvq.eval.surfaces import no_surface_reason
from ctvq.eval.tokens import sample_batch
from ctvq.models.vqvae import SparseSDFVQVAE
from ctvq.train.checkpoint import atomic_torch_save, model_payload

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqvae" / "tiny_stage2.json"
MODEL_ARGS = dict(resolution=8, model_channels=32, latent_channels=4, num_blocks=1, num_embeddings=16,
                  num_head_channels=16, window_size=2, sparse_backend="torch")


def _run_dir(root: Path, samples: list[SparseSample], collapsed: bool) -> Path:
    """A run folder (config.json, ckpts/final.pt) of a tiny model: collapsed, or random with a surface.

    The random decoder's sdf varies little (0.031-0.038); shifting its output by the median of what it
    decodes for ``samples`` puts half their voxels inside, so each has a (meaningless) surface."""
    config = json.loads(CONFIG.read_text())
    config["models"]["vqvae"]["args"].update(MODEL_ARGS)
    (root / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = SparseSDFVQVAE(**MODEL_ARGS).eval()
    torch.nn.init.normal_(model.encoder.out_layer.weight, std=0.5)
    with torch.no_grad():
        if collapsed:
            model.decoder.out_layer.bias.fill_(5.0)
        else:
            torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.5)
            decoded = torch.cat([model.decode(model.encode(sample_batch(s))[0]).feats[:, 0] for s in samples])
            model.decoder.out_layer.bias -= torch.atanh(decoded.median())
    atomic_torch_save(model_payload(model.state_dict(), model.config, 2, 7), root / "ckpts" / "final.pt")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("samples")
    samples = []
    for i, radius in enumerate((9.0, 11.0)):
        dist = spheres_distance(64, [(30.5 + i, 32.2, 31.7, radius)])
        samples.append(sample_from_distance(dist, case_id=f"sphere{i}"))
        save_sample(samples[-1], folder / f"sphere{i}.npz")
    return {"collapsed": _run_dir(tmp_path_factory.mktemp("collapsed"), samples, True),
            "random": _run_dir(tmp_path_factory.mktemp("random"), samples, False), "samples": folder}


def test_no_surface_reason_names_the_side_or_the_missing_triangles() -> None:
    assert no_surface_reason(np.ones(5), 0) == "all 5 decoded voxels are outside (sdf >= 0)"
    assert no_surface_reason(np.zeros(5), 0) == "all 5 decoded voxels are outside (sdf >= 0)"
    assert no_surface_reason(-np.ones(3), 0) == "all 3 decoded voxels are inside (sdf < 0)"
    assert "2 of 4 decoded voxels are inside" in no_surface_reason(np.array([-1, -1, 1, 1.0]), 0)
    assert no_surface_reason(np.array([-1, 1.0]), 12) is None


def test_eval_exit_code_fails_only_when_every_case_collapsed(capsys) -> None:
    assert collapse_exit_code({"num_cases": 3, "collapsed_cases": 2}, False) == 0
    assert collapse_exit_code({"num_cases": 3, "collapsed_cases": 3}, False) == EXIT_NO_SURFACE
    assert "all 3 evaluated cases collapsed" in capsys.readouterr().err
    assert collapse_exit_code({"num_cases": 3, "collapsed_cases": 3}, True) == 0
    assert "ctvq eval: warning: all 3" in capsys.readouterr().err


def test_decode_of_a_collapsed_checkpoint_exits_3_without_writing_an_empty_ply(runs, tmp_path, capsys):
    ckpt = str(runs["collapsed"] / "ckpts" / "final.pt")
    tokens, ply, sdf = tmp_path / "t.npz", tmp_path / "r.ply", tmp_path / "r_sdf.npz"
    assert main(["encode", "--ckpt", ckpt, str(runs["samples"] / "sphere0.npz"), "-o", str(tokens)]) == 0
    capsys.readouterr()
    rc = main(["decode", "--ckpt", ckpt, str(tokens), "-o", str(ply), "--sdf-out", str(sdf)])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_NO_SURFACE == 3
    assert len(err.splitlines()) == 1 and err.startswith("ctvq decode: error: sphere0: the decoded field has")
    with np.load(sdf) as data:
        n = data["sdf"].shape[0]
        assert (data["sdf"] > 0).all()  # the evidence is kept
    assert f"all {n} decoded voxels are outside (sdf >= 0)" in err and "collapsed" in err
    assert not ply.exists()
    assert main(["decode", "--ckpt", ckpt, str(tokens), "-o", str(ply), "--allow-empty"]) == 0
    assert ply.is_file() and "0 triangles" in capsys.readouterr().err


def test_eval_flags_collapsed_cases_writes_everything_and_fails_when_all_collapsed(runs, tmp_path, capsys):
    def evaluate(run: str, out: Path, *extra: str) -> int:
        return main(["eval", "--ckpt", str(runs[run] / "ckpts" / "final.pt"), "--data", str(runs["samples"]),
                     "-o", str(out / "metrics.json"), "--points", "500", "--no-figures", *extra])

    out = tmp_path / "collapsed"
    assert evaluate("collapsed", out) == EXIT_NO_SURFACE
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "WARNING: collapse:" in line]
    assert len(warnings) == 2 and "case sphere0: no reconstructed surface (all" in warnings[0]
    assert "ctvq eval: error: all 2 evaluated cases collapsed" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapsed_cases"] == 2 and metrics["num_cases"] == 2
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["collapsed"] for r in rows] == ["True", "True"]
    assert (out / "meshes" / "sphere1_recon.ply").is_file()  # every output is written before the exit
    assert evaluate("collapsed", tmp_path / "allowed", "--allow-collapse", "--no-meshes") == 0
    assert "ctvq eval: warning: all 2 evaluated cases collapsed" in capsys.readouterr().err

    assert evaluate("random", tmp_path / "random", "--no-meshes") == 0
    assert "WARNING" not in capsys.readouterr().err
    healthy = json.loads((tmp_path / "random" / "metrics.json").read_text())
    assert healthy["collapsed_cases"] == 0
    rows = list(csv.DictReader((tmp_path / "random" / "cases.csv").open()))
    assert [r["collapsed"] for r in rows] == ["False"] * 2


@pytest.mark.parametrize("crafted", ["../../escaped", "/tmp/escaped_abs"])
def test_eval_refuses_a_sample_whose_case_id_would_write_outside_its_folder(runs, tmp_path, capsys, crafted):
    from dataclasses import replace

    from ctvq.ct.sample import load_sample

    data = tmp_path / "data"
    data.mkdir()
    sample = replace(load_sample(runs["samples"] / "sphere0.npz"), case_id=crafted)
    save_sample(sample, data / "crafted.npz")
    out = tmp_path / "a" / "b" / "out"
    rc = main(["eval", "--ckpt", str(runs["random"] / "ckpts" / "final.pt"), "--data", str(data),
               "-o", str(out / "metrics.json"), "--points", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "cannot name output files" in err[-1] and "crafted.npz" in err[-1]
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    written += [p.name for p in Path("/tmp").glob("escaped*")]
    assert not any(name.startswith("escaped") for name in written)


def test_a_surface_that_encloses_none_of_the_input_counts_as_collapsed() -> None:
    from ctvq.eval.surfaces import collapse_reason, dense_box

    coords = np.array([[x, y, z] for x in range(5) for y in range(5) for z in range(4)])
    outside = dense_box(coords, np.ones(100), np.zeros(3, int), (5, 5, 4))
    reason = collapse_reason(outside, 0, 0.0, 50)
    assert "no reconstructed surface (all 100 decoded voxels are outside" in reason
    mixed = dense_box(coords, np.r_[-np.ones(3), np.ones(97)], np.zeros(3, int), (5, 5, 4))
    # a few stray triangles away from the anatomy: measured on real bone at 64³ (148 faces, IoU 0)
    assert "encloses none of the input's inside (IoU 0)" in collapse_reason(mixed, 148, 0.0, 12706)
    assert collapse_reason(mixed, 148, 0.01, 12706) is None  # some overlap: a bad model, not a collapse
    assert collapse_reason(mixed, 148, 0.0, 0) is None  # the input has no surface either


def test_eval_checks_every_sample_before_it_evaluates_any(runs, tmp_path, capsys) -> None:
    """Samples are loaded one at a time, but a mismatched one anywhere in the data still stops the run
    before the first case is evaluated or anything is written."""
    from dataclasses import replace

    from ctvq.ct.sample import load_sample

    data = tmp_path / "data"
    data.mkdir()
    first = load_sample(runs["samples"] / "sphere0.npz")
    save_sample(first, data / "a_sphere0.npz")
    save_sample(replace(first, case_id="other_band", band=first.band / 2), data / "z_other_band.npz")
    out = tmp_path / "out"
    rc = main(["eval", "--ckpt", str(runs["random"] / "ckpts" / "final.pt"), "--data", str(data),
               "-o", str(out / "metrics.json"), "--points", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "z_other_band.npz" in err[-1] and "but the checkpoint was trained with band" in err[-1]
    assert "[1/2]" not in "\n".join(err) and not out.exists()
