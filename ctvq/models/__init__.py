"""The sparse SDF VQ-VAE: encoder, vector quantizer, decoder, chunked decoding and pretrained loading."""

from ctvq.models.chunking import ChunkPlan, pick_training_chunk, plan_chunks
from ctvq.models.decoder import SparseSDFDecoder
from ctvq.models.encoder import SparseSDFEncoder, group_count
from ctvq.models.pretrained import (
    LoadReport,
    PretrainedWeightsError,
    checkpoint_payload,
    inspect_weights,
    load_pretrained,
)
from ctvq.models.quantizer import QuantizerOutput, VectorQuantizer
from ctvq.models.vqvae import LOSS_TYPES, SparseSDFVQVAE, gather_targets, model_defaults

__all__ = [
    "LOSS_TYPES",
    "ChunkPlan",
    "LoadReport",
    "PretrainedWeightsError",
    "QuantizerOutput",
    "SparseSDFDecoder",
    "SparseSDFEncoder",
    "SparseSDFVQVAE",
    "VectorQuantizer",
    "checkpoint_payload",
    "gather_targets",
    "group_count",
    "inspect_weights",
    "load_pretrained",
    "model_defaults",
    "pick_training_chunk",
    "plan_chunks",
]
