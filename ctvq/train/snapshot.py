"""``i_sample`` snapshots: one axial slice of a training sample, input band vs supervision vs reconstruction.

Only the chosen slice is rasterised (a dense 512³ grid would cost 512 MB), from the forward pass the step
already made, so a snapshot adds no model work. With chunked decoding the reconstruction covers the chunk
that step decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ctvq.atomic import atomic_write_bytes


def slice_image(coords: torch.Tensor, values: torch.Tensor, sample: int, axis_z: int,
                size: int) -> np.ndarray:
    """[size, size] float image of ``values`` at voxels (batch == sample, z == axis_z); NaN elsewhere."""
    c = coords.detach().cpu().long()
    v = values.detach().cpu().float().reshape(-1)
    keep = (c[:, 0] == sample) & (c[:, 3] == axis_z)
    image = np.full((size, size), np.nan, dtype=np.float32)
    image[c[keep, 1].numpy(), c[keep, 2].numpy()] = v[keep].numpy()
    return image


def write_snapshot(path: Path, batch: dict, out: dict, step: int) -> Path:
    """PNG of sample 0's middle occupied z slice: input SDF, decoder target, reconstruction, |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = batch["coords"]
    size = int(batch["resolution"])
    mine = coords[coords[:, 0] == 0]
    z = int((mine[:, 3].min() + mine[:, 3].max()) // 2)
    recon = out["recon"]
    panels = {
        "input sdf (band)": slice_image(coords, batch["feats"], 0, z, size),
        "target": slice_image(recon.coords, out["target"], 0, z, size),
        "reconstruction": slice_image(recon.coords, recon.feats[:, 0], 0, z, size),
    }
    panels["|error|"] = np.abs(panels["reconstruction"] - panels["target"])
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (title, image) in zip(axes, panels.items(), strict=True):
        vmin, vmax = (0.0, 1.0) if title == "|error|" else (-1.0, 1.0)
        ax.imshow(image.T, origin="lower", cmap="magma" if title == "|error|" else "coolwarm",
                  vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    case = batch["case_ids"][0] if "case_ids" in batch else "sample 0"
    fig.suptitle(f"step {step}  {case}  z={z}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["slice_image", "write_snapshot"]
