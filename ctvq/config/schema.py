"""The config schema: frozen dataclasses, one per section, with the reference's defaults.

Every field of the configuration reference is here with its documented default; fields ctvq adds beyond the
reference are marked "ctvq:" in the comments. Stage-dependent defaults (``stage=(stage 1, stage 2)``) resolve
from ``trainer.args.training_stage``. Build instances with :func:`ctvq.config.load_config` /
:func:`ctvq.config.config_from_dict`, which validate; ``to_dict()`` gives the fully resolved JSON form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ctvq.choices import ATTENTION_BACKENDS, AUGMENTS, LOSS_TYPES, RECON_WEIGHTINGS
from ctvq.config.fields import (
    DECAY_FACTOR,
    NON_EMPTY,
    NON_NEGATIVE,
    OPEN_UNIT,
    PERCENTILE,
    POSITIVE,
    REQUIRED,
    Check,
    at_least,
    each,
    spec,
)
from ctvq.ct.windows import CUSTOM, WINDOWS

WINDOW_PRESETS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {name: (w.width, w.level) for name, w in WINDOWS.items()}
)
"""Named CT windows as (width, level) in HU (the registry of ``ctvq.ct.windows``); ``custom`` takes both
from the dataset args."""

_ADAM = ("AdamW", "Adam")
MODEL_CHANNELS = Check(lambda v: v >= 16 and v % 16 == 0,
                       "must be a positive multiple of 16 (the decoder's upsampling uses model_channels/4, "
                       "/8 and /16 channels); Direct3D-S2 uses 512")
SDF_CHANNELS = Check(lambda v: len(v) == 3 and all(c >= 1 for c in v),
                     "must be 3 positive ints (full, half and quarter resolution), or null")
NO_REPRESENTATION = Check(lambda v: v is None,
                          "must be null: ctvq's decoder predicts one signed distance per voxel and reads no "
                          "representation config (a value here would be ignored)")
BETAS = Check(lambda b: len(b) == 2 and all(0 <= x < 1 for x in b), "must be two numbers, each in [0, 1)")


def _plain(value: Any) -> Any:
    """JSON form of a field value: tuples become lists, nested configs their dicts."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    return value


def _args(cfg: Any, exclude: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in exclude}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """``models.vqvae``: the sparse SDF VQ-VAE (Direct3D-S2's SparseSDFVAE architecture plus a codebook).

    ``resolution`` is the LATENT grid (dataset resolution / 8). ``window_size`` only acts for windowed
    attention modes (swin, shift_*) but must be >= 1 always. ``chunk_size`` splits the latent grid into
    chunk_size³ chunks for decoding (training decodes one random chunk in stage 2, evaluation decodes all)
    and must divide ``resolution``.

    ctvq extras:
    - ``sdf_input_scale``: multiplier on the normalised SDF fed to the encoder (the pretrained model's input
      scale is unpublished, so it is a setting to measure);
    - codebook health: ``codebook_init`` ("random" | "kmeans" from encoder outputs), ``codebook_update``
      ("loss": codebook loss gradients | "ema": EMA cluster updates with ``codebook_ema_decay``),
      ``dead_code_threshold`` (usage count below which a code is restarted; 0 disables restarts). Defaults
      kmeans + ema + 0.1 come from the measurement in bench/results/train.json (codebook_health): random init
      collapsed to one code (usage 0.008), kmeans+ema kept 0.34 usage and restarts kept more codes alive;
    - ``sparse_backend``: "torch" (pure PyTorch, everywhere), "spconv" (GPU) or "auto" (spconv when it and a
      GPU are available, else torch).
    """

    name: Literal["SparseSDFVQVAE"] = spec("SparseSDFVQVAE",
                                           doc="The model class: SparseSDFVQVAE (the only one).")
    resolution: int = spec(64, check=at_least(1),
                           doc="Side of the latent grid in cells: the dataset resolution / 8. Sizes the "
                               "absolute position table (pe_mode ape).")
    model_channels: int = spec(512, check=MODEL_CHANNELS,
                               doc="Width of the encoder and decoder transformers and of the "
                                   "first decoder level; parameters and activations grow with "
                                   "it.", memory=True)
    latent_channels: int = spec(16, check=at_least(1),
                                doc="Channels of each latent cell: the length of a code vector.")
    num_blocks: int = spec(8, check=at_least(1),
                           doc="Transformer blocks in the encoder, and again in the decoder.", memory=True)
    num_embeddings: int = spec(8192, check=at_least(1), doc="Number of codes in the codebook.")
    num_heads: int | None = spec(None, check=at_least(1),
                                 doc="Attention heads; null: model_channels / num_head_channels.")
    num_head_channels: int = spec(64, check=at_least(1),
                                  doc="Channels per attention head, used when num_heads is null.")
    mlp_ratio: float = spec(4.0, check=POSITIVE,
                            doc="Hidden width of each block's MLP, as a multiple of "
                                "model_channels.", memory=True)
    attn_mode: Literal["full", "shift_window", "shift_sequence", "shift_order", "swin"] = spec("swin",
        doc="Which latent cells attend to each other: full (all: memory grows with the square "
            "of the cell count), swin and shift_window (3D windows of window_size cells per "
            "side, shifted every other block), shift_sequence and shift_order (windows along a "
            "serialised order).", memory=True)
    window_size: int = spec(8, check=at_least(1),
                            doc="Window side in latent cells for the windowed attention modes; "
                                "full ignores it.", memory=True)
    pe_mode: Literal["ape", "rope"] = spec("ape",
                                           doc="Position encoding: ape (a learned table over the latent "
                                               "grid) or rope (rotary, relative positions).")
    use_fp16: bool = spec(False,
                          doc="Hold the model's weights in half precision (norms stay in fp32);"
                              " see trainer.args.fp16_mode.", memory=True)
    use_checkpoint: bool = spec(False,
                                doc="Recompute the transformer blocks' activations in the "
                                    "backward pass instead of keeping them (gradient "
                                    "checkpointing): less activation memory, more compute.", memory=True)
    chunk_size: int = spec(1, check=at_least(1),
                           doc="Decode the latent grid in chunk_size^3 chunks: stage 2 decodes "
                               "one random chunk per step, evaluation every chunk in turn; must"
                               " divide resolution.", memory=True)
    qk_rms_norm: bool = spec(False, doc="RMS-normalise queries and keys before attention.")
    representation_config: dict[str, Any] | None = spec(None, check=NO_REPRESENTATION,
        doc="Must be null: the decoder predicts one signed distance per voxel.")
    # ctvq extras
    sdf_input_scale: float = spec(1.0, check=POSITIVE,
                                  doc="Factor on the normalised signed distance the encoder reads.")
    codebook_init: Literal["random", "kmeans"] = spec("kmeans",
        doc="How codes start: random (unit normal), or kmeans (k-means++ and Lloyd steps on the encoder "
            "outputs of the first training batch).")
    codebook_update: Literal["loss", "ema"] = spec("ema",
        doc="How codes move: loss (gradients of the codebook loss) or ema (moving averages of the encoder "
            "outputs assigned to each code).")
    codebook_ema_decay: float = spec(0.99, check=OPEN_UNIT, doc="Decay of the ema codebook updates.")
    dead_code_threshold: float = spec(0.1, check=NON_NEGATIVE,
                                      doc="A code whose moving usage (assignments per step) falls below this "
                                          "is restarted on a current encoder output; 0 never restarts.")
    sparse_backend: Literal["torch", "spconv", "auto"] = spec("auto",
        doc="Sparse convolutions: torch (pure PyTorch, everywhere), spconv (CUDA only) or auto (spconv when "
            "it and a GPU are there).")
    attention_backend: Literal[ATTENTION_BACKENDS] = spec("sdpa",
        doc="The attention kernel: sdpa (PyTorch's scaled_dot_product_attention, everywhere), flash_attn or "
            "xformers (their variable-length CUDA kernels; the package must be installed, checked when the "
            "model is built).")
    sdf_channels: tuple[int, ...] | None = spec(None, check=SDF_CHANNELS,
        doc="Channels of the encoder's and decoder's sdf blocks at full, half and quarter resolution, e.g. "
            "[16, 32, 64]; null: model_channels/16, /8, /4 (Direct3D-S2's layout, which pretrained weights "
            "need). At a narrow model the default leaves 4 channels per full-resolution voxel.", memory=True)

    @property
    def heads(self) -> int:
        """Attention heads: ``num_heads`` if set, else model_channels / num_head_channels."""
        return self.num_heads if self.num_heads is not None else self.model_channels // self.num_head_channels

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": _args(self)}


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """``dataset``: which precomputed samples to read and how to filter/crop them.

    ``name`` may be given as ``dataset.name`` (TRELLIS style) or ``dataset.args.name`` (the reference); both
    must agree. ``max_points`` defaults to 100000 in stage 1 and 500000 in stage 2 (the reference's values).
    ctvq extras: ``window_type`` also accepts "custom", which then needs ``window_width`` (> 0) and
    ``window_level`` in HU (both must be absent for the named windows); ``band`` is the SDF truncation in
    voxels; ``iso_value`` is the surface level on the windowed [0, 1] scale (0.5 = the window level);
    ``seed`` makes max_points crops deterministic; ``augment`` draws a symmetry of the voxel cube per training
    item (``flips``: axis flips, ``cube``: flips and axis orders), exact on the sparse sample.
    """

    name: Literal["CTWindowSparseSDF", "SparseSDF"] = spec("CTWindowSparseSDF",
        doc="The dataset class: CTWindowSparseSDF (SparseSDF is the same).")
    resolution: int = spec(512, check=at_least(64),
                           doc="Cube side of the samples in voxels (ctvq window --resolution); "
                               "samples of another size are refused. ctvq train --resolution (the "
                               "workflow's per-window resolution) sets it and models.vqvae.args.resolution.",
                           memory=True)
    window_type: Literal[(*WINDOWS, CUSTOM)] = spec("lung",
        doc="The HU window the samples were made with: lung, bone, soft_tissue, brain or custom; samples of "
            "another window are refused.")  # type: ignore[valid-type]
    min_points: int = spec(100, check=NON_NEGATIVE,
                           doc="Cases with fewer band voxels are left out (and listed as filtered).")
    max_points: int = spec(stage=(100_000, 500_000), check=at_least(1),
                           doc="Cases with more band voxels are cut to a crop of whole latent "
                               "cells holding about this many (a new seeded crop per item): the"
                               " data size of a step.", memory=True)
    cache_data: bool = spec(False,
                            doc="Keep every sample in host memory after its first read instead "
                                "of reading it again each time.", memory=True)
    precompute_sparse: bool = spec(True,
                                   doc="true: read the samples of ctvq index; false: build each sample from "
                                       "its windowed volume (ctvq window) when loaded.")
    # ctvq extras
    window_width: float | None = spec(None, check=POSITIVE,
                                      doc="Window width in HU, for window_type custom only.")
    window_level: float | None = spec(None, doc="Window level in HU, for window_type custom only.")
    band: float = spec(3.0, check=POSITIVE,
                       doc="SDF band half-width in voxels that the samples were made with (ctvq sdf --band);"
                           " samples with another band are refused.")
    iso_value: float = spec(0.5, check=OPEN_UNIT,
                            doc="Surface level on the windowed 0-1 scale that the samples were made with "
                                "(0.5: the window level).")
    seed: int = spec(0, check=NON_NEGATIVE, doc="Seed of the max_points crops and the augmentations.")
    augment: Literal[AUGMENTS] = spec("none",
                                      doc="Per training item: none, flips (one of the 8 axis flips) or cube "
                                          "(one of the 48 symmetries of the cube), exact on the sparse "
                                          "sample.")  # ctvq: see ctvq.data.augment

    def window(self) -> tuple[float, float]:
        """(width, level) in HU of this dataset's window."""
        if self.window_type == "custom":
            if self.window_width is None or self.window_level is None:
                raise ValueError("custom window without window_width/window_level: use load_config")
            return self.window_width, self.window_level
        return WINDOW_PRESETS[self.window_type]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": _args(self)}


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """``trainer.args.optimizer``: {name, args}. Another optimizer's arguments are errors; here they are None.

    ``lr`` defaults to 5e-3 (stage 1) / 1e-4 (stage 2); ``trainer.args.lr`` is accepted as a shorthand.
    Unlisted defaults follow torch: betas (0.9, 0.999), eps 1e-8, momentum 0, nesterov false.
    """

    name: Literal["AdamW", "Adam", "SGD"] = spec("AdamW", doc="torch.optim class: AdamW, Adam or SGD.")
    lr: float = spec(stage=(5e-3, 1e-4), check=POSITIVE,
                     doc="Learning rate at step 0 (trainer.args.lr is accepted as a shorthand).")
    weight_decay: float = spec(0.0, check=NON_NEGATIVE, doc="Weight decay (decoupled for AdamW).")
    betas: tuple[float, ...] | None = spec(by_name={n: (0.9, 0.999) for n in _ADAM}, check=BETAS,
                                           doc="Adam's moment decays (AdamW, Adam).")
    eps: float | None = spec(by_name={n: 1e-8 for n in _ADAM}, check=POSITIVE,
                             doc="Adam's denominator epsilon (AdamW, Adam).")
    momentum: float | None = spec(by_name={"SGD": 0.0}, check=NON_NEGATIVE, doc="SGD momentum.")
    nesterov: bool | None = spec(by_name={"SGD": False}, doc="SGD with Nesterov momentum.")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.optim.<name>`` (only this optimizer's arguments)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": {k: _plain(v) for k, v in self.kwargs().items()}}


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """``trainer.args.lr_scheduler``: {name, args}, stepped once per training step (T_max counts steps).

    Defaults: stage 1 CosineAnnealingLR(T_max 100000, eta_min 5e-5), stage 2 ExponentialLR(gamma 0.999)
    (the reference's). StepLR needs ``step_size``; its gamma defaults to torch's 0.1. ``lr_scheduler: null``
    (or name null) means a constant learning rate; the trainer then holds ``lr_scheduler = None``.
    """

    name: Literal["CosineAnnealingLR", "ExponentialLR", "StepLR"] = spec("CosineAnnealingLR",
        doc="torch.optim.lr_scheduler class, stepped once per training step: CosineAnnealingLR, "
            "ExponentialLR or StepLR.")
    T_max: int | None = spec(by_name={"CosineAnnealingLR": 100_000}, check=at_least(1),
                             doc="CosineAnnealingLR: steps of one half cosine period.")
    eta_min: float | None = spec(by_name={"CosineAnnealingLR": 5e-5}, check=NON_NEGATIVE,
                                 doc="CosineAnnealingLR: the lowest learning rate.")
    gamma: float | None = spec(by_name={"ExponentialLR": 0.999, "StepLR": 0.1}, check=DECAY_FACTOR,
                               doc="ExponentialLR: factor per step; StepLR: factor every step_size steps.")
    step_size: int | None = spec(by_name={"StepLR": REQUIRED}, check=at_least(1),
                                 doc="StepLR: steps between decays.")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.optim.lr_scheduler.<name>`` (only this scheduler's arguments)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": self.kwargs()}


@dataclass(frozen=True, kw_only=True)
class GradClipConfig:
    """``trainer.args.grad_clip``: a number (plain norm clip, ``name == "norm"``) or AdaptiveGradClipper.

    AdaptiveGradClipper clips to min(max_norm, the clip_percentile-th percentile of recent gradient norms).
    Default: AdaptiveGradClipper(max_norm 1.0, clip_percentile 95). ``grad_clip: null`` disables clipping.
    """

    name: Literal["norm", "AdaptiveGradClipper"] = spec("AdaptiveGradClipper",
        doc="norm (clip the gradient norm to max_norm) or AdaptiveGradClipper.")
    max_norm: float = spec(1.0, check=POSITIVE, doc="The largest gradient norm let through.")
    clip_percentile: float | None = spec(by_name={"AdaptiveGradClipper": 95.0}, check=PERCENTILE,
                                         doc="AdaptiveGradClipper: clip to the smaller of max_norm and this "
                                             "percentile of recent gradient norms.")

    def to_dict(self) -> float | dict[str, Any]:
        if self.name == "norm":
            return self.max_norm
        args = {"max_norm": self.max_norm, "clip_percentile": self.clip_percentile}
        return {"name": self.name, "args": args}


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """``trainer``: two-stage training loop (TRELLIS trainer semantics).

    ``training_stage`` is required: 1 freezes encoder+decoder and trains the codebook, 2 trains everything.
    ``pretrained_vae_path``: stage 1 a Direct3D-S2 VAE file or null (random init, for tests); stage 2 a
    stage-1 checkpoint (required). Paths are kept as written, relative to the working directory (see
    :func:`ctvq.config.resolve_path`). Stage-dependent defaults: max_steps 100000/200000,
    batch_size_per_gpu 2/1, loss_type l1/l1_l2. ``batch_split`` must divide ``batch_size_per_gpu``
    (micro-batches split by samples); when not given it is the reference's 2 reduced to gcd(2,
    batch_size_per_gpu), since the reference's stage-2 defaults (batch 1, split 2) contradict each other.
    ``fp16_mode``: null = fp32 training; "amp" = autocast + GradScaler; "inflat_all" = fp32 master copy and a
    2^log_scale loss scale. ``models.vqvae.args.use_fp16: true`` with
    ``fp16_mode: null`` is allowed: the model then holds half-precision weights (norms in fp32) and the
    trainer does no loss scaling and keeps no fp32 master copy, so gradients may underflow (expert setting).
    ``ema_rate`` may be empty (no EMA copies). ctvq extra: ``seed``.
    """

    name: Literal["VQVAETrainer"] = spec("VQVAETrainer",
                                         doc="The trainer class: VQVAETrainer (the only one).")
    training_stage: Literal[1, 2] = spec(REQUIRED,
                                         doc="1: the codebook (stage1_mode says against what); 2: encoder, "
                                             "decoder and codebook together, from the stage-1 checkpoint.")
    pretrained_vae_path: str | None = spec(None, check=NON_EMPTY,
                                           doc="Stage 1: Direct3D-S2 VAE weights, or null (no weights: see "
                                               "stage1_mode); stage 2: the stage-1 checkpoint (required).")
    max_steps: int = spec(stage=(100_000, 200_000), check=at_least(1),
                          doc="Optimizer steps to train (ctvq train --max-steps overrides it).")
    max_epoch: int | None = spec(None, check=at_least(1),
                                 doc="Also stop after this many passes over the training cases, if sooner.")
    batch_size_per_gpu: int = spec(stage=(2, 1), check=at_least(1),
                                   doc="Samples per step in each process.", memory=True)
    batch_split: int = spec(2, check=at_least(1),
                            doc="Micro-batches per step: the batch runs in this many parts with"
                                " gradients accumulated; must divide batch_size_per_gpu.", memory=True)
    num_workers: int = spec(30, check=NON_NEGATIVE,
                            doc="Data-loading worker processes (0: load in the training "
                                "process).", memory=True)
    loss_type: Literal[LOSS_TYPES] = spec(stage=("l1", "l1_l2"),
                                          doc="Per-voxel reconstruction error: l1, mse, or l1_l2 (their "
                                              "sum).")
    stage1_mode: Literal["codebook", "autoencoder"] = spec("codebook",
        doc="Stage 1 only: codebook (train the codebook against the frozen pretrained encoder) or "
            "autoencoder (train encoder and decoder with the quantizer bypassed, then fit the codebook by "
            "k-means on the encoder outputs).")  # ctvq: see config_warnings
    recon_weighting: Literal[RECON_WEIGHTINGS] = spec("balanced",
        doc="How decoded voxels are averaged: balanced (deep inside, band inside, band outside and far "
            "outside each weigh a quarter), uniform (the plain mean) or band (band and sign-only voxels half"
            " each).")  # ctvq: see voxel_weights
    recon_weighting_anneal_steps: int = spec(0, check=NON_NEGATIVE,
        doc="Move the weights linearly from recon_weighting to the plain mean over this many steps; 0 keeps "
            "recon_weighting.")  # ctvq: see Trainer.uniform_mix
    lambda_vq: float = spec(1.0, check=NON_NEGATIVE, doc="Weight of the codebook loss.")
    lambda_commitment: float = spec(0.25, check=NON_NEGATIVE, doc="Weight of the commitment loss.")
    fp16_mode: Literal["amp", "inflat_all"] | None = spec("inflat_all",
        doc="Mixed precision: null (fp32), amp (autocast and a gradient scaler) or inflat_all "
            "(fp16 weights, an fp32 master copy and a loss scale).", memory=True)
    fp16_scale_growth: float = spec(0.001, check=NON_NEGATIVE,
                                    doc="inflat_all: how fast the log2 loss scale grows per step without "
                                        "overflow.")
    ema_rate: tuple[float, ...] = spec((0.9999,), check=each(OPEN_UNIT),
                                       doc="Decay of each exponential moving average of the "
                                           "weights kept and saved with checkpoints (one copy "
                                           "each; empty: none).", memory=True)
    i_print: int = spec(1000, check=at_least(1), doc="Steps between progress lines (rate and ETA).")
    i_log: int = spec(500, check=at_least(1), doc="Steps between rows of metrics.csv (and TensorBoard).")
    i_sample: int = spec(10_000, check=at_least(1),
                         doc="Steps between snapshot figures and the collapse check.")
    i_save: int = spec(10_000, check=at_least(1), doc="Steps between checkpoints.")
    i_ddpcheck: int = spec(10_000, check=at_least(1),
                           doc="Steps between checks that the model replicas of a multi-process run agree.")
    disable_snapshot: bool = spec(False, doc="Write no snapshot figures.")
    seed: int = spec(0, check=NON_NEGATIVE, doc="Seed of initialisation, data order and crops.")
    optimizer: OptimizerConfig = spec(REQUIRED, nested=True, doc="The optimizer: {name, args}.")
    lr_scheduler: SchedulerConfig | None = spec(REQUIRED, nested=True,
        doc="The learning-rate schedule: {name, args}, or null for a constant rate.")
    grad_clip: GradClipConfig | None = spec(REQUIRED, nested=True,
                                            doc="Gradient clipping: a number (plain norm clip), {name, "
                                                "args}, or null for none.")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": _args(self)}


@dataclass(frozen=True, kw_only=True)
class CTVQConfig:
    """A whole training config. ``description`` (ctvq extra) is free text for humans; ``origin`` names the
    file it came from (not part of equality)."""

    model: ModelConfig
    dataset: DatasetConfig
    trainer: TrainerConfig
    description: str = ""
    origin: str = dataclasses.field(default="<dict>", compare=False)

    @property
    def stage(self) -> int:
        return self.trainer.training_stage

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (every default filled); config_from_dict of it gives an equal config."""
        out: dict[str, Any] = {
            "models": {"vqvae": self.model.to_dict()},
            "dataset": self.dataset.to_dict(),
            "trainer": self.trainer.to_dict(),
        }
        if self.description:
            out["description"] = self.description
        return out
