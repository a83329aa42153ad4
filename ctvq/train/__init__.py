"""Training: the two-stage VQ-VAE trainer, its checkpoints, precision modes, EMA, clipping and DDP helpers."""

from ctvq.train.checkpoint import CheckpointError, final_path, load_stage_input
from ctvq.train.clip import AdaptiveGradClipper, NormClipper, build_clipper
from ctvq.train.distributed import ReplicaMismatchError, check_replicas
from ctvq.train.ema import ParameterEMA
from ctvq.train.precision import Precision, StepResult
from ctvq.train.trainer import RunOptions, Trainer, TrainSummary

__all__ = [
    "AdaptiveGradClipper",
    "CheckpointError",
    "NormClipper",
    "ParameterEMA",
    "Precision",
    "ReplicaMismatchError",
    "RunOptions",
    "StepResult",
    "TrainSummary",
    "Trainer",
    "build_clipper",
    "check_replicas",
    "final_path",
    "load_stage_input",
]
