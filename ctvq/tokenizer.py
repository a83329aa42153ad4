"""The Python API: a trained checkpoint as a tokenizer of CT scans.

    from ctvq import Tokenizer
    tok = Tokenizer.from_checkpoint("results/train/lung/stage2/ckpts/final.pt")
    tokens = tok.encode("scan.nii.gz")           # or a sample .npz, or a SparseSample
    grid = tokens.dense_indices()                # (R/8)^3 int32 code grid, -1 where the case has no cell
    coords, indices = tok.as_tensors(tokens)     # torch LongTensors [M, 3] and [M] for downstream models
    field = tok.decode(tokens)                   # sparse SDF on the full grid, with its affine
    tok.mesh(field).vertices                     # the surface in patient millimetres

A scan is preprocessed exactly as the model's training data was (window, resolution, band and iso value from
the run's ``config.json``, surface cleaning at the window's defaults), so ``encode`` of a raw scan and of the
workflow's sample of it give the same tokens. ``ctvq encode`` / ``ctvq decode`` are this class on the command
line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ctvq.ct.sample import SparseSample

if TYPE_CHECKING:
    import torch

    from ctvq.eval.loading import DataSettings, LoadedModel
    from ctvq.eval.surfaces import Mesh
    from ctvq.eval.tokens import Tokens


@dataclass(frozen=True)
class DecodedField:
    """What the decoder reconstructs: ``coords`` (N, 3) voxels of the full grid, ``sdf`` (N,) in [-1, 1]
    (distance / band), ``affine`` voxel -> patient mm."""

    coords: np.ndarray
    sdf: np.ndarray
    affine: np.ndarray
    band: float
    case_id: str


class Tokenizer:
    """A trained VQ-VAE with the data settings it was trained on; see the module docstring."""

    def __init__(self, loaded: LoadedModel, settings: DataSettings) -> None:
        from ctvq.eval.loading import check_model_settings

        check_model_settings(loaded, settings)
        self.loaded = loaded
        self.settings = settings

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                        device: str = "cpu") -> Tokenizer:
        """A ctvq checkpoint; its data settings come from the run folder's ``config.json`` unless ``config``
        names the training config."""
        from ctvq.eval.loading import load_model, load_settings

        return cls(load_model(path, device), load_settings(path, config))

    @property
    def num_embeddings(self) -> int:
        return self.loaded.num_embeddings

    def sample(self, source: str | os.PathLike | SparseSample, case_id: str | None = None) -> SparseSample:
        """The model input of a scan file or DICOM folder (preprocessed with the training settings), of a
        sample file (checked against them) or of a SparseSample (checked)."""
        from ctvq.eval.tokens import model_input

        return model_input(self.settings, source, case_id)

    def encode(self, source: str | os.PathLike | SparseSample, case_id: str | None = None) -> Tokens:
        from ctvq.eval.tokens import encode_sample

        return encode_sample(self.loaded, self.sample(source, case_id))

    def decode(self, tokens: Tokens, other_codebook: bool = False) -> DecodedField:
        """The reconstruction of ``tokens`` (refused if another codebook encoded them, unless
        ``other_codebook``)."""
        from ctvq.eval.tokens import decode_tokens

        coords, sdf = decode_tokens(self.loaded, tokens, tokens.case_id, other_codebook=other_codebook)
        return DecodedField(coords, sdf, np.asarray(tokens.affine), tokens.band, tokens.case_id)

    def mesh(self, decoded: DecodedField | Tokens) -> Mesh:
        """The zero-level surface (patient mm) of a decoded field, or of tokens (decoded first)."""
        from ctvq.eval.surfaces import sparse_surface

        field = decoded if isinstance(decoded, DecodedField) else self.decode(decoded)
        return sparse_surface(field.coords, field.sdf, field.affine)

    def as_tensors(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent coordinates [M, 3], code indices [M]) as int64 tensors on the model's device."""
        import torch

        device = next(self.loaded.model.parameters()).device
        return (torch.from_numpy(tokens.latent_coords.astype(np.int64)).to(device),
                torch.from_numpy(tokens.indices.astype(np.int64)).to(device))


__all__ = ["DecodedField", "Tokenizer"]
