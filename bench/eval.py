"""Benchmark: seconds to evaluate one case (encode, decode, field metrics, marching cubes, surface distances).

A chest phantom is preprocessed at ``--resolution`` (512 by default) with the lung window (preprocessing is
not timed), and evaluated with an untrained model of the given width (timing only: an untrained decoder's
output has no zero level, so ``--perturb`` optionally replaces the decoded field by the input field plus noise
to time the surface part on a realistic surface). Writes JSON with total seconds and each part's share.

    .venv/bin/python bench/eval.py [--resolution 512] [--model-channels 64] [--num-blocks 2] [--points 100000]
        [--chunk-size 1] [--device cpu] [--threads 2] [--out bench/results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctvq.ct.phantom import chest_phantom
from ctvq.ct.pipeline import build_sample, window_image
from ctvq.ct.sample import decoder_targets
from ctvq.ct.windows import WINDOWS
from ctvq.eval.evaluate import compare_fields
from ctvq.eval.loading import LoadedModel
from ctvq.eval.metrics import surface_distances
from ctvq.eval.surfaces import box_surface
from ctvq.eval.tokens import cell_voxels, decode_tokens, encode_sample
from ctvq.models.vqvae import SparseSDFVQVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--model-channels", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--perturb", type=float, default=0.05,
                        help="noise sigma (normalised SDF) for the surface part; 0 times the raw decode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ct = chest_phantom((224, 224, 72), (0.7, 0.7, 2.0), seed=0)
    sample = build_sample(window_image(ct, WINDOWS["lung"], args.resolution, "bench"), band=3.0)
    model = SparseSDFVQVAE(resolution=args.resolution // 8, model_channels=args.model_channels,
                           latent_channels=8, num_blocks=args.num_blocks, num_embeddings=1024,
                           num_head_channels=32, attn_mode="swin", window_size=8, chunk_size=args.chunk_size)
    model.to(args.device).eval()
    loaded = LoadedModel(model, Path("<untrained>"), None, None)

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    tokens = encode_sample(loaded, sample)
    seconds["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    coords, values = decode_tokens(loaded, tokens)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds["decode"] = time.perf_counter() - t
    if args.perturb > 0:  # a stand-in reconstruction with a surface: the input field plus noise
        rng = np.random.default_rng(0)
        coords = cell_voxels(sample.latent_coords)
        values = np.clip(decoder_targets(sample).reshape(-1) + rng.normal(0, args.perturb, coords.shape[0]),
                         -1, 1).astype(np.float32)
    t = time.perf_counter()
    input_box, recon_box, field = compare_fields(sample, coords, values)
    seconds["field_metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    mesh_in = box_surface(input_box, sample.affine)
    mesh_rec = box_surface(recon_box, sample.affine)
    seconds["marching_cubes"] = time.perf_counter() - t
    t = time.perf_counter()
    surface = surface_distances(mesh_rec.vertices, mesh_rec.faces, mesh_in.vertices, mesh_in.faces,
                                points=args.points)
    seconds["surface_distances"] = time.perf_counter() - t
    total = sum(seconds.values())
    result = {
        "resolution": args.resolution, "device": args.device, "threads": args.threads,
        "model_channels": args.model_channels, "num_blocks": args.num_blocks, "chunk_size": args.chunk_size,
        "points": args.points, "perturb": args.perturb,
        "band_voxels": sample.num_points, "tokens": tokens.num_tokens, "decoded_voxels": int(coords.shape[0]),
        "input_faces": mesh_in.num_faces, "recon_faces": mesh_rec.num_faces,
        "seconds_total": total, "seconds": seconds, "share": {k: v / total for k, v in seconds.items()},
        "metrics": {**field, **surface},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
