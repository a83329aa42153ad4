"""Allowed values of the config's choice keys that the model and data code implement.

A leaf module (it imports nothing): the config schema, which must load without torch, and the model and
data code all read the values here, and no package has to import another for them.
"""

LOSS_TYPES: tuple[str, ...] = ("mse", "l1", "l1_l2")
RECON_WEIGHTINGS: tuple[str, ...] = ("uniform", "balanced", "band")
AUGMENTS: tuple[str, ...] = ("none", "flips", "cube")  # ctvq.data.augment
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "flash_attn", "xformers")  # ctvq.sparse.attention

__all__ = ["ATTENTION_BACKENDS", "AUGMENTS", "LOSS_TYPES", "RECON_WEIGHTINGS"]
