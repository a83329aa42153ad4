"""`ctvq validate-config` and `ctvq inspect-weights` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctvq.cli import main
from ctvq.models.pretrained import checkpoint_payload
from ctvq.models.vqvae import SparseSDFVQVAE

ROOT = Path(__file__).resolve().parents[1]


def test_validate_config_accepts_every_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "configs" / "vqvae").glob("*.json"))
    assert main(["validate-config", *files]) == 0
    assert capsys.readouterr().out.count(": ok") == len(files)


def test_validate_config_names_the_file_and_key_of_each_mistake(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"vqvae": {"args": {"chunk_sise": 2}}},
                               "trainer": {"args": {"training_stage": 1, "chunk_size": 4}}}))
    assert main(["validate-config", str(bad)]) == 2
    out = capsys.readouterr().out
    assert f"{bad}: models.vqvae.args.chunk_sise" in out and "did you mean 'chunk_size'" in out
    assert "trainer.args.chunk_size" in out and "belongs in models.vqvae.args" in out


def test_inspect_weights_reports_the_architecture_of_a_checkpoint(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model = SparseSDFVQVAE(resolution=8, model_channels=64, latent_channels=8, num_blocks=1,
                           num_embeddings=32)
    path = tmp_path / "tiny.pt"
    torch.save(checkpoint_payload(model), path)
    assert main(["inspect-weights", str(path)]) == 0
    report = capsys.readouterr().out
    assert "model_channels" in report and "64" in report and "num_blocks" in report


def test_inspect_weights_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"junk")
    assert main(["inspect-weights", str(path)]) == 2
    assert "junk.pt" in capsys.readouterr().err
