"""Benchmark: what the codebook costs. Per case, the reconstruction through the tokens (encoder -> nearest
code -> decoder, what `ctvq eval` measures) against the decoder run on the encoder's continuous output, with
no quantization. Equal numbers mean the codebook loses nothing and the encoder and decoder are what limit
the quality; a gap means the codebook is too small or too coarse for the anatomy.

    .venv/bin/python bench/codebook_gap.py --ckpt RUN/ckpts/final.pt --data MANIFEST.csv [--data ...]
        [--cases ID,ID] [--threads 1] [--out bench/results/codebook_gap.json]

Prints one line per case (split, tokens' and continuous IoU and band SDF MAE in voxels) and the means.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctvq.ct.sample import SparseSample, load_sample
from ctvq.eval.evaluate import compare_fields, eval_cases
from ctvq.eval.loading import LoadedModel, load_model
from ctvq.eval.tokens import decode_tokens, encode_sample, sample_batch

KEYS = ("occupancy_iou", "sdf_mae_vox")


@torch.no_grad()
def codebook_gap(loaded: LoadedModel, sample: SparseSample) -> dict[str, float]:
    """``tokens_*`` and ``continuous_*`` IoU and band SDF MAE (voxels) of one case, and their difference."""
    coords, values = decode_tokens(loaded, encode_sample(loaded, sample), what=sample.case_id)
    _, _, tokens = compare_fields(sample, coords, values)
    model = loaded.model
    out = model.decode(model.continuous_latent(sample_batch(sample, next(model.parameters()).device)))
    _, _, continuous = compare_fields(sample, out.coords[:, 1:].cpu().numpy().astype(np.int64),
                                      out.feats[:, 0].float().cpu().numpy())
    row = {f"tokens_{k}": float(tokens[k]) for k in KEYS}
    row |= {f"continuous_{k}": float(continuous[k]) for k in KEYS}
    row["iou_lost_to_codebook"] = row["continuous_occupancy_iou"] - row["tokens_occupancy_iou"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="manifest CSV, sample folder or file (repeatable)")
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: every ok case)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/codebook_gap.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.ckpt)  # in eval mode
    wanted = set(args.cases.split(",")) if args.cases else None
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for data in args.data:
        for case in eval_cases(data):
            if wanted is not None and case.case_id is not None and case.case_id not in wanted:
                continue  # a manifest names its cases: skip before loading the sample
            sample = load_sample(case.path)
            if wanted is not None and sample.case_id not in wanted:
                continue
            row = {"case_id": sample.case_id, "split": case.split, **codebook_gap(loaded, sample)}
            rows.append(row)
            print(f"{row['case_id']} ({row['split']}): IoU tokens {row['tokens_occupancy_iou']:.3f}, "
                  f"continuous {row['continuous_occupancy_iou']:.3f}; SDF MAE voxel "
                  f"{row['tokens_sdf_mae_vox']:.3f} / {row['continuous_sdf_mae_vox']:.3f}", flush=True)
    if not rows:
        raise SystemExit("codebook_gap: no case matched --cases in --data")
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("case_id", "split")}
    print("mean: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ckpt": str(args.ckpt), "data": [str(d) for d in args.data],
                                    "machine": platform.platform(), "threads": args.threads,
                                    "seconds": time.perf_counter() - start, "cases": rows, "mean": means},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
