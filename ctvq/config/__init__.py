"""Training configs: typed, validated at load time, defaults exactly as the configuration reference gives.

Use :func:`load_config` (a JSON file) or :func:`config_from_dict`; both raise :class:`ConfigError` listing
every problem with the file and the key path. ``CTVQConfig.to_dict()`` is the fully resolved form.
"""

from ctvq.config.errors import ConfigError, Problem
from ctvq.config.loader import (
    ACCEPTED_KEYS,
    config_from_dict,
    load_config,
    resolution_overrides,
    resolve_path,
)
from ctvq.config.rules import config_warnings
from ctvq.config.schema import (
    WINDOW_PRESETS,
    CTVQConfig,
    DatasetConfig,
    GradClipConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
)

__all__ = [
    "ACCEPTED_KEYS",
    "WINDOW_PRESETS",
    "CTVQConfig",
    "ConfigError",
    "DatasetConfig",
    "GradClipConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Problem",
    "SchedulerConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_warnings",
    "load_config",
    "resolution_overrides",
    "resolve_path",
]
