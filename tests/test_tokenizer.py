"""The Python API (``from ctvq import Tokenizer``) on a real trained checkpoint: it gives what the command
line gives, for samples and for raw scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import train_main, write_config, write_data

from ctvq import Tokenizer
from ctvq.cli import main
from ctvq.eval.loading import EvalInputError
from ctvq.eval.tokens import load_tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tok")
    data = write_data(root / "data", cases=3)
    config = write_config(root / "cfg.json", max_steps=2)
    assert train_main(["--config", str(config), "--data", str(data), "--output-dir", str(root / "run"),
                       "--threads", "1", "--no-tensorboard"]) == 0
    return root / "run" / "ckpts" / "final.pt", data.parent


def test_encode_decode_match_the_command_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, samples = trained
    tok = Tokenizer.from_checkpoint(ckpt)
    tokens = tok.encode(samples / "c2.npz")
    assert main(["encode", "--ckpt", str(ckpt), str(samples / "c2.npz"), "-o", str(tmp_path / "t.npz")]) == 0
    cli = load_tokens(tmp_path / "t.npz")
    assert np.array_equal(tokens.indices, cli.indices)
    assert np.array_equal(tokens.latent_coords, cli.latent_coords)
    grid = tokens.dense_indices()
    assert grid.shape == (8, 8, 8) and int((grid >= 0).sum()) == tokens.num_tokens
    c = tokens.latent_coords[0]
    assert grid[c[0], c[1], c[2]] == tokens.indices[0]
    coords, indices = tok.as_tensors(tokens)
    assert coords.dtype == indices.dtype == torch.int64 and coords.shape == (tokens.num_tokens, 3)
    field = tok.decode(tokens)
    assert field.coords.shape == (tokens.num_tokens * 512, 3) and np.abs(field.sdf).max() <= 1.0
    assert np.array_equal(field.affine, tokens.affine)
    mesh = tok.mesh(field)
    assert mesh.vertices.ndim == 2 and mesh.faces.ndim == 2


def test_a_raw_scan_is_preprocessed_like_the_training_data(trained: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    ckpt, _ = trained
    scan = tmp_path / "p.nii.gz"
    assert main(["phantom", "-o", str(scan), "--shape", "64", "64", "24"]) == 0
    tok = Tokenizer.from_checkpoint(ckpt)
    band = str(tok.settings.band)
    windowed = str(tmp_path / "w.npz")
    for step in (["window", str(scan), "--window", "lung", "--resolution", "64", "-o", windowed],
                 ["sdf", str(tmp_path / "w.npz"), "-o", str(tmp_path / "b.npz"), "--band", band],
                 ["index", str(tmp_path / "b.npz"), "-o", str(tmp_path / "s.npz")]):
        assert main(step) == 0
    direct, via_steps = tok.encode(scan), tok.encode(tmp_path / "s.npz")
    assert direct.num_tokens > 0
    assert np.array_equal(direct.indices, via_steps.indices)
    assert np.array_equal(direct.latent_coords, via_steps.latent_coords)


def test_a_sample_of_other_settings_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, samples = trained
    tok = Tokenizer.from_checkpoint(ckpt)
    other = tok.sample(samples / "c0.npz")
    from dataclasses import replace

    with pytest.raises(EvalInputError, match="band 3 voxels but the checkpoint was trained with band 1.5"):
        tok.encode(replace(other, band=3.0))
