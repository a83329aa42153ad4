"""Tokens and the eval/encode/decode commands against a real (tiny, untrained) VQ-VAE checkpoint.

The untrained decoder's sdf is ~0.03 at every voxel, all outside (no surface): `ctvq eval` and `ctvq decode`
would exit 3 for it (see test_eval_collapse.py), so these tests of the plumbing pass --allow-collapse and
--allow-empty.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import sample_from_distance, spheres_distance, write_manifest

from ctvq.cli import main
from ctvq.ct.sample import FigurePlanes, load_sample, save_sample
from ctvq.ct.splits import SplitRule
from ctvq.eval.evaluate import figure_planes_for
from ctvq.eval.loading import EvalInputError, load_model
from ctvq.eval.tokens import decode_tokens, encode_sample, load_tokens, sample_batch, save_tokens
from ctvq.models.vqvae import SparseSDFVQVAE
from ctvq.train.checkpoint import atomic_torch_save, model_payload

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqvae" / "tiny_stage2.json"
MODEL_ARGS = dict(resolution=8, model_channels=32, latent_channels=4, num_blocks=1, num_embeddings=16,
                  num_head_channels=16, window_size=2, sparse_backend="torch")


def _tiny_model() -> SparseSDFVQVAE:
    torch.manual_seed(0)
    model = SparseSDFVQVAE(**MODEL_ARGS)
    # Direct3D-S2 zero-initialises the output layers; random ones give a non-trivial reconstruction.
    for layer in (model.encoder.out_layer, model.decoder.out_layer):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `ctvq train` leaves it: config.json (lung, 64^3) and ckpts/final.pt."""
    run = tmp_path_factory.mktemp("run")
    config = json.loads(CONFIG.read_text())
    config["models"]["vqvae"]["args"].update(MODEL_ARGS)
    (run / "config.json").write_text(json.dumps(config))
    model = _tiny_model()
    atomic_torch_save(model_payload(model.state_dict(), model.config, 2, 7), run / "ckpts" / "final.pt")
    return run


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("samples")
    affine = np.diag([0.6, 0.6, 0.6, 1.0])
    for i, radius in enumerate((9.0, 11.0)):
        dist = spheres_distance(64, [(30.5 + i, 32.2, 31.7, radius)])
        sample = sample_from_distance(dist, case_id=f"sphere{i}", affine=affine)
        if i == 0:  # as `ctvq index` writes them: the CT its figure is drawn over (sphere1: none)
            ct = np.clip(0.5 - dist / 8.0, 0.0, 1.0).astype(np.float32)
            centre = np.round(sample.coords.mean(axis=0)).astype(np.int64)
            sample = replace(sample, figure_planes=FigurePlanes.of(ct, centre))
        save_sample(sample, folder / f"sphere{i}.npz")
    bone = sample_from_distance(spheres_distance(64, [(32, 32, 32, 9.0)]), case_id="bone", window="bone")
    save_sample(bone, folder.parent / "bone.npz")
    return folder


@pytest.mark.slow
def test_encode_file_decode_equals_the_models_own_reconstruction(run_dir, samples, tmp_path):
    loaded = load_model(run_dir / "ckpts" / "final.pt")
    sample = load_sample(samples / "sphere0.npz")
    save_tokens(encode_sample(loaded, sample), tmp_path / "t.npz")
    tokens = load_tokens(tmp_path / "t.npz")
    coords, sdf = decode_tokens(loaded, tokens)
    with torch.no_grad():
        latent, indices = loaded.model.encode(sample_batch(sample))
        direct = loaded.model.decode(loaded.model.latent_from_indices(latent.coords, indices, batch_size=1))
    np.testing.assert_array_equal(tokens.indices, indices.numpy())
    np.testing.assert_array_equal(coords, direct.coords[:, 1:].numpy())
    np.testing.assert_array_equal(sdf, direct.feats[:, 0].numpy())
    assert tokens.num_tokens == sample.num_latent and coords.shape[0] == 512 * sample.num_latent
    assert np.abs(sdf).max() > 0  # a real decode, not the zero-initialised output layer


@pytest.mark.slow
def test_cli_encode_then_decode_writes_tokens_ply_and_sdf(run_dir, samples, tmp_path):
    ckpt = str(run_dir / "ckpts" / "final.pt")
    assert main(["encode", "--ckpt", ckpt, str(samples / "sphere1.npz"), "-o", str(tmp_path / "t.npz")]) == 0
    assert main(["decode", "--ckpt", ckpt, str(tmp_path / "t.npz"), "-o", str(tmp_path / "r.ply"),
                 "--sdf-out", str(tmp_path / "r.npz"), "--allow-empty"]) == 0
    tokens = load_tokens(tmp_path / "t.npz")
    assert tokens.num_embeddings == 16 and tokens.window == "lung"
    np.testing.assert_allclose(tokens.affine, np.diag([0.6, 0.6, 0.6, 1.0]))
    with np.load(tmp_path / "r.npz") as data:
        assert data["coords"].shape[0] == 512 * tokens.num_tokens
    assert (tmp_path / "r.ply").stat().st_size > 0


@pytest.mark.slow
def test_eval_writes_flat_metrics_cases_figures_meshes_and_curves(run_dir, samples, tmp_path):
    log = run_dir / "metrics.csv"
    log.write_text("step,loss,perplexity,recon_loss,usage\n10,0.9,3.0,0.8,0.2\n20,0.5,5.0,0.4,0.3\n")
    out = tmp_path / "eval"
    rc = main(["eval", "--ckpt", str(run_dir / "ckpts" / "final.pt"), "--data", str(samples),
               "-o", str(out / "metrics.json"), "--points", "2000", "--allow-collapse"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_cases"] == 2 and metrics["tokens_per_case"] > 0
    for key in ("sdf_mae_mm", "sdf_mae_vox", "occupancy_iou", "chamfer_l1_mm", "chamfer_l2_mm2",
                "fscore_0.5mm", "fscore_1mm", "codebook_usage", "perplexity"):
        assert key in metrics
    assert all(not isinstance(v, dict | list) for v in metrics.values())
    assert metrics["eval_split"] == "train" and metrics["train/num_cases"] == 2  # a folder has no split
    assert 0 < metrics["codebook_usage"] <= 1
    assert metrics["sdf_mae_mm"] == pytest.approx(metrics["sdf_mae_vox"] * 0.6)
    assert (out / "cases.csv").read_text().count("sphere") == 2
    for name in ("figures/sphere0.png", "figures/sphere1.png", "meshes/sphere0_input.ply",
                 "meshes/sphere1_recon.ply", "training_curves.png"):
        assert (out / name).stat().st_size > 0
    curves = (out / "training_curves.csv").read_text().splitlines()
    assert curves[0] == "step,stage,loss,recon_loss,usage,perplexity" and len(curves) == 3
    # the figure's CT comes from the sample itself: no windowed volume is needed
    with_planes = figure_planes_for(samples / "sphere0.npz", load_sample(samples / "sphere0.npz"), None)
    assert with_planes is not None and with_planes.planes.shape == (3, 64, 64)
    assert figure_planes_for(samples / "sphere1.npz", load_sample(samples / "sphere1.npz"), None) is None


def test_sample_of_another_window_is_refused_with_exit_2(run_dir, samples, tmp_path, capsys):
    rc = main(["encode", "--ckpt", str(run_dir / "ckpts" / "final.pt"), str(samples.parent / "bone.npz"),
               "-o", str(tmp_path / "t.npz")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "window 'bone'" in err and "'lung'" in err and len(err.splitlines()) == 1


def test_tokens_of_another_codebook_size_are_refused(run_dir, samples, tmp_path, capsys):
    ckpt = str(run_dir / "ckpts" / "final.pt")
    assert main(["encode", "--ckpt", ckpt, str(samples / "sphere0.npz"), "-o", str(tmp_path / "t.npz")]) == 0
    tokens = load_tokens(tmp_path / "t.npz")
    save_tokens(type(tokens)(**{**tokens.__dict__, "num_embeddings": 32}), tmp_path / "other.npz")
    rc = main(["decode", "--ckpt", ckpt, str(tmp_path / "other.npz"), "-o", str(tmp_path / "r.ply")])
    assert rc == 2
    assert "codebook of 32 codes" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["direct3d", "random", "misc", "garbage"])
def test_checkpoints_of_the_wrong_kind_are_refused(tmp_path, kind):
    model = _tiny_model()
    path = tmp_path / "weights.pt"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}
    if kind == "direct3d":
        torch.save({"vae": state, "config": {"name": "SparseSDFVAE", "params": {}}}, path)
        expected = "no codebook"
    elif kind == "random":
        torch.save({"weight": torch.zeros(3)}, path)
        expected = "raw state dict"
    elif kind == "misc":
        torch.save({"optimizer": {}, "scheduler": {}, "rng": {}}, path)
        expected = "training-state file"
    else:
        path.write_bytes(b"not a checkpoint")
        expected = "not a torch checkpoint"
    with pytest.raises(EvalInputError, match=expected):
        load_model(path)


def test_missing_run_config_asks_for_config(samples, tmp_path, capsys):
    model = _tiny_model()
    ckpt = tmp_path / "lonely.pt"
    atomic_torch_save(model_payload(model.state_dict(), model.config, 2, 1), ckpt)
    rc = main(["encode", "--ckpt", str(ckpt), str(samples / "sphere0.npz"), "-o", str(tmp_path / "t.npz")])
    assert rc == 2 and "--config" in capsys.readouterr().err


def _eval(run_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    rc = main(["eval", "--ckpt", str(run_dir / "ckpts" / "final.pt"), "--data", str(data),
               "-o", str(out / "metrics.json"), "--points", "500", "--no-figures", "--no-meshes",
               "--allow-collapse", *extra])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_eval_reports_every_case_per_split_with_val_as_the_headline(run_dir, samples, tmp_path, capsys):
    split_file = tmp_path / "splits.csv"
    split_file.write_text("case_id,split\nsphere0,train\nsphere1,val\n")
    manifest = write_manifest(samples / "held_out.csv", sorted(samples.glob("sphere*.npz")),
                              split=SplitRule(file=split_file))
    metrics = _eval(run_dir, manifest, tmp_path / "all")
    err = capsys.readouterr().err
    assert metrics["eval_split"] == "val" and list(metrics)[:2] == ["eval_split", "val/num_cases"]
    assert metrics["val/num_cases"] == 1 and metrics["train/num_cases"] == 1 and metrics["num_cases"] == 2
    assert not any(k.startswith("test/") for k in metrics)
    for key in ("occupancy_iou", "chamfer_l1_mm", "sdf_mae_mm", "codebook_usage", "perplexity"):
        assert f"val/{key}" in metrics and f"train/{key}" in metrics
    both = (metrics["val/sdf_mae_mm"] + metrics["train/sdf_mae_mm"]) / 2
    assert metrics["sdf_mae_mm"] == pytest.approx(both)  # the flat keys: all cases, splits mixed
    cases = (tmp_path / "all" / "cases.csv").read_text().splitlines()
    assert cases[0].startswith("case_id,split,") and cases[1].startswith("sphere0,train,")
    assert "ctvq eval: val (1 cases): IoU" in err and "TRAINING-case" not in err

    only_val = _eval(run_dir, manifest, tmp_path / "val", "--split", "val")
    assert only_val["eval_split"] == "val" and only_val["num_cases"] == 1
    assert only_val["val/occupancy_iou"] == metrics["val/occupancy_iou"]
    assert not any(k.startswith("train/") for k in only_val)
    rc = main(["eval", "--ckpt", str(run_dir / "ckpts" / "final.pt"), "--data", str(manifest),
               "-o", str(tmp_path / "t" / "metrics.json"), "--split", "test"])
    assert rc == 2 and "no ok case in split test (ok cases by split: train 1, val 1, test 0)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_eval_without_held_out_cases_says_they_are_training_metrics(run_dir, samples, tmp_path, capsys):
    manifest = write_manifest(samples / "all_train.csv", sorted(samples.glob("sphere*.npz")))
    metrics = _eval(run_dir, manifest, tmp_path / "out")
    assert metrics["eval_split"] == "train" and metrics["train/num_cases"] == 2
    assert not any(k.startswith(("val/", "test/")) for k in metrics)
    assert "ctvq eval: no held-out cases: these are TRAINING-case metrics\n" in capsys.readouterr().err


def test_training_curves_of_both_stages_continue_the_step_count(tmp_path):
    from ctvq.eval.figures import training_curves

    first, second = tmp_path / "s1.csv", tmp_path / "s2.csv"
    first.write_text("step,loss,recon_loss\n10,0.9,0.8\n20,0.7,0.6\n")  # stage 1 (autoencoder): no usage
    second.write_text("step,loss,recon_loss,usage\n10,0.5,0.4,0.3\n20,0.4,0.3,0.5\n")
    columns = training_curves([first, second], tmp_path / "c.png", tmp_path / "c.csv")
    assert columns == ["loss", "recon_loss", "usage"]
    table = (tmp_path / "c.csv").read_text().splitlines()
    assert table == ["step,stage,loss,recon_loss,usage", "10,1,0.9,0.8,", "20,1,0.7,0.6,",
                     "30,2,0.5,0.4,0.3", "40,2,0.4,0.3,0.5"]
    with pytest.raises(EvalInputError, match="missing.csv: training log not found"):
        training_curves([first, tmp_path / "missing.csv"], tmp_path / "c.png", tmp_path / "c.csv")


def test_eval_chunk_size_decodes_the_same_field_and_a_bad_one_is_refused(run_dir, samples, tmp_path, capsys):
    """`ctvq eval --chunk-size` (ctvq plan's remedy for evaluation memory) changes memory, not the output."""
    whole = _eval(run_dir, samples / "sphere0.npz", tmp_path / "whole")
    chunked = _eval(run_dir, samples / "sphere0.npz", tmp_path / "chunked", "--chunk-size", "2")
    for key in ("sdf_mae_vox", "occupancy_iou", "decoded_voxels", "recon_faces"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
    capsys.readouterr()
    ckpt = str(run_dir / "ckpts" / "final.pt")
    assert main(["eval", "--ckpt", ckpt, "--data", str(samples / "sphere0.npz"), "-o",
                 str(tmp_path / "m.json"), "--chunk-size", "3"]) == 2
    assert "--chunk-size 3: must be >= 1 and divide the latent resolution 8" in capsys.readouterr().err
