"""Token files: a CT case as latent coordinates + codebook indices, and the model calls that make/read them.

``tokens.npz`` (format version 1) holds ``latent_coords`` (M, 3) int16 on the ``resolution / 8`` grid,
``indices`` (M,) int32 into a codebook of ``num_embeddings`` entries, the voxel -> patient mm ``affine`` of
the ``resolution``³ grid, the window (name, width, level), ``iso_value``, ``band``, ``case_id``, ``source``.
``codebook_sha256`` names the codebook that gave the indices their meaning: decoding with any other
codebook (another run, or another step of the same run: stage 2 keeps updating it) is refused, since it
would silently decode different shapes. Files written before that key existed decode with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctvq.ct.sample import LATENT_STRIDE, SparseSample, load_sample
from ctvq.ct.volume_file import load_npz, save_npz_atomic
from ctvq.ct.windows import Window
from ctvq.data.collate import collate_sparse
from ctvq.data.datasets import sample_to_item
from ctvq.eval.loading import DataSettings, EvalInputError, LoadedModel

TOKEN_FORMAT_VERSION = 1
_KIND = "ctvq-tokens"
_KEYS = ("latent_coords", "indices", "num_embeddings", "resolution", "affine", "window", "window_width",
         "window_level", "iso_value", "band", "case_id", "source")


@dataclass(frozen=True)
class Tokens:
    latent_coords: np.ndarray  # (M, 3) int16
    indices: np.ndarray  # (M,) int32
    num_embeddings: int
    resolution: int
    affine: np.ndarray
    window: str
    window_width: float
    window_level: float
    iso_value: float
    band: float
    case_id: str
    source: str = ""
    codebook_sha256: str = ""  # "" in files written before the key existed

    @property
    def num_tokens(self) -> int:
        return int(self.indices.shape[0])

    def dense_indices(self, empty: int = -1) -> np.ndarray:
        """The code indices as a dense (R/8, R/8, R/8) int32 grid, ``empty`` where the case has no cell (for
        downstream models that want a fixed-size input)."""
        grid_size = self.resolution // LATENT_STRIDE
        grid = np.full((grid_size,) * 3, empty, dtype=np.int32)
        c = self.latent_coords.astype(np.int64)
        grid[c[:, 0], c[:, 1], c[:, 2]] = self.indices
        return grid


def save_tokens(tokens: Tokens, path: str | os.PathLike) -> None:
    save_npz_atomic(path, {
        "kind": np.asarray(_KIND),
        "format_version": np.asarray(TOKEN_FORMAT_VERSION),
        "latent_coords": tokens.latent_coords.astype(np.int16),
        "indices": tokens.indices.astype(np.int32),
        "num_embeddings": np.asarray(tokens.num_embeddings),
        "resolution": np.asarray(tokens.resolution),
        "affine": np.asarray(tokens.affine, dtype=np.float64),
        "window": np.asarray(tokens.window),
        "window_width": np.asarray(tokens.window_width),
        "window_level": np.asarray(tokens.window_level),
        "iso_value": np.asarray(tokens.iso_value),
        "band": np.asarray(tokens.band),
        "case_id": np.asarray(tokens.case_id),
        "source": np.asarray(tokens.source),
        "codebook_sha256": np.asarray(tokens.codebook_sha256),
    }, level=6)


def load_tokens(path: str | os.PathLike) -> Tokens:
    d = load_npz(path, _KIND, TOKEN_FORMAT_VERSION, _KEYS, error=EvalInputError,
                 remedy="make it with `ctvq encode`", optional=("codebook_sha256",))
    tokens = Tokens(
        latent_coords=d["latent_coords"].astype(np.int16), indices=d["indices"].astype(np.int32),
        num_embeddings=int(d["num_embeddings"]), resolution=int(d["resolution"]), affine=d["affine"],
        window=str(d["window"]), window_width=float(d["window_width"]), window_level=float(d["window_level"]),
        iso_value=float(d["iso_value"]), band=float(d["band"]), case_id=str(d["case_id"]),
        source=str(d["source"]), codebook_sha256=str(d["codebook_sha256"]) if "codebook_sha256" in d else "",
    )
    m = tokens.indices.shape[0]
    if tokens.latent_coords.shape != (m, 3) or tokens.affine.shape != (4, 4):
        raise EvalInputError(f"{path}: latent_coords {tokens.latent_coords.shape}, indices ({m},), affine "
                             f"{tokens.affine.shape} do not fit together")
    if m and (tokens.indices.min() < 0 or tokens.indices.max() >= tokens.num_embeddings):
        raise EvalInputError(f"{path}: code indices outside [0, {tokens.num_embeddings})")
    grid = tokens.resolution // LATENT_STRIDE
    if tokens.resolution % LATENT_STRIDE or tokens.resolution < LATENT_STRIDE:
        raise EvalInputError(f"{path}: resolution {tokens.resolution} is not a multiple of {LATENT_STRIDE}")
    if m and (tokens.latent_coords.min() < 0 or tokens.latent_coords.max() >= grid):
        bad = tokens.latent_coords[((tokens.latent_coords < 0) | (tokens.latent_coords >= grid)).any(axis=1)]
        raise EvalInputError(f"{path}: {bad.shape[0]} token coordinate(s) outside the {grid}^3 latent grid "
                             f"of resolution {tokens.resolution}, e.g. {bad[0].tolist()}: a damaged or "
                             "edited file; encode the case again")
    if np.unique(tokens.latent_coords, axis=0).shape[0] != m:
        raise EvalInputError(f"{path}: the same latent cell holds several tokens: a damaged or edited file")
    return tokens


def model_input(settings: DataSettings, source: str | os.PathLike | SparseSample,
                case_id: str | None = None) -> SparseSample:
    """The model input of a scan file or DICOM folder (preprocessed with the training ``settings``), of a
    sample file or of a SparseSample (both checked against them)."""
    if isinstance(source, SparseSample):
        sample, what = source, source.case_id
    elif Path(source).is_file() and Path(source).suffix.lower() == ".npz":
        sample, what = load_sample(source), str(source)
    else:
        from ctvq.ct.pipeline import build_sample, window_scan  # SimpleITK: only for raw scans

        window = Window(settings.window, settings.window_width, settings.window_level)
        volume = window_scan(source, window, settings.resolution, case_id)
        return build_sample(volume, band=settings.band, iso_value=settings.iso_value)
    settings.check_sample(sample.window, sample.window_width, sample.window_level, sample.resolution,
                          sample.band, what)
    return sample


def sample_batch(sample: SparseSample, device: torch.device | str = "cpu") -> dict:
    """A one-case model batch of a whole (uncropped) sample."""
    batch = collate_sparse([sample_to_item(sample, num_points_full=sample.num_points)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def encode_sample(loaded: LoadedModel, sample: SparseSample) -> Tokens:
    """Tokens of one case: the encoder's latent voxels and their nearest codes."""
    model = loaded.model
    if sample.resolution != loaded.data_resolution:
        raise EvalInputError(f"{sample.case_id}: sample resolution {sample.resolution} but {loaded.path} "
                             f"encodes {loaded.data_resolution}^3")
    device = next(model.parameters()).device
    latent, indices = model.encode(sample_batch(sample, device))
    return Tokens(
        latent_coords=latent.coords[:, 1:].cpu().numpy().astype(np.int16),
        indices=indices.cpu().numpy().astype(np.int32),
        num_embeddings=loaded.num_embeddings, resolution=sample.resolution, affine=sample.affine,
        window=sample.window, window_width=sample.window_width, window_level=sample.window_level,
        iso_value=sample.iso_value, band=sample.band, case_id=sample.case_id, source=sample.source,
        codebook_sha256=loaded.codebook_sha256,
    )


@torch.no_grad()
def decode_tokens(loaded: LoadedModel, tokens: Tokens, what: str = "tokens", other_codebook: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Decoded voxels (N, 3) int64 on the full grid and their normalised SDF (N,) float32.

    Decoding goes through the codebook lookup (never the encoder's float latents), so encode -> file ->
    decode gives exactly what the model reconstructs. In eval mode the decoder honours ``chunk_size``.
    ``other_codebook``: decode although the tokens name another codebook (comparing checkpoints on purpose).
    """
    if tokens.num_embeddings != loaded.num_embeddings:
        raise EvalInputError(f"{what}: made with a codebook of {tokens.num_embeddings} codes but "
                             f"{loaded.path} has {loaded.num_embeddings}; decode with the checkpoint that "
                             "encoded them")
    if tokens.codebook_sha256 and tokens.codebook_sha256 != loaded.codebook_sha256 and not other_codebook:
        raise EvalInputError(f"{what}: encoded with another codebook (sha256 {tokens.codebook_sha256[:12]}) "
                             f"than {loaded.path}'s ({loaded.codebook_sha256[:12]}): the indices would mean "
                             "other shapes. Decode with the checkpoint that encoded them, or pass "
                             "--other-codebook to decode anyway")
    if tokens.resolution != loaded.data_resolution:
        raise EvalInputError(f"{what}: resolution {tokens.resolution} but {loaded.path} decodes "
                             f"{loaded.data_resolution}^3")
    model = loaded.model
    device = next(model.parameters()).device
    m = tokens.num_tokens
    coords = torch.zeros((m, 4), dtype=torch.int32, device=device)
    coords[:, 1:] = torch.from_numpy(tokens.latent_coords.astype(np.int32)).to(device)
    latent = model.latent_from_indices(coords, torch.from_numpy(tokens.indices.astype(np.int64)).to(device),
                                       batch_size=1)
    out = model.decode(latent)
    return out.coords[:, 1:].cpu().numpy().astype(np.int64), out.feats[:, 0].float().cpu().numpy()


def cell_voxels(latent_coords: np.ndarray) -> np.ndarray:
    """Every full-resolution voxel (M * 512, 3) of the given latent cells."""
    local = np.stack(np.meshgrid(*[np.arange(LATENT_STRIDE)] * 3, indexing="ij"), -1).reshape(-1, 3)
    base = np.asarray(latent_coords, dtype=np.int64) * LATENT_STRIDE
    return (base[:, None, :] + local[None]).reshape(-1, 3)


__all__ = ["TOKEN_FORMAT_VERSION", "Tokens", "cell_voxels", "decode_tokens", "encode_sample", "load_tokens",
           "model_input", "sample_batch", "save_tokens"]
