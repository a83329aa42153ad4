"""Allowed values of the config's choice keys implemented outside the config package.

The schema must load without torch (``ctvq validate-config`` and every preprocessing command), so the values
live here, once, and the model and data code import them from here.
"""

LOSS_TYPES: tuple[str, ...] = ("mse", "l1", "l1_l2")
RECON_WEIGHTINGS: tuple[str, ...] = ("uniform", "balanced", "band")
AUGMENTS: tuple[str, ...] = ("none", "flips", "cube")  # ctvq.data.augment

__all__ = ["AUGMENTS", "LOSS_TYPES", "RECON_WEIGHTINGS"]
