"""CT display windows (width / level in HU) and the windowed scale the surfaces are extracted on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctvq.ct.errors import CTInputError

DEFAULT_ISO = 0.5


@dataclass(frozen=True)
class Window:
    """windowed = clip((HU - (level - width / 2)) / width, 0, 1)."""

    name: str
    width: float
    level: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise CTInputError(f"window {self.name!r}: width must be > 0 HU, got {self.width}")

    def apply(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Windowed float32 volume in [0, 1]; ``out`` may be ``hu`` itself to save a full copy."""
        low = np.float32(self.level - self.width / 2.0)
        scale = np.float32(1.0 / self.width)
        result = np.subtract(hu, low, out=out, dtype=np.float32)
        np.multiply(result, scale, out=result)
        return np.clip(result, 0.0, 1.0, out=result)

    def iso_hu(self, iso_value: float = DEFAULT_ISO) -> float:
        """The HU value of the iso-surface at ``iso_value`` on the windowed scale."""
        return self.level - self.width / 2.0 + iso_value * self.width


WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("lung", 1500.0, -600.0),
        Window("bone", 1500.0, 300.0),
        Window("soft_tissue", 400.0, 50.0),
        Window("brain", 80.0, 35.0),
    )
}
CUSTOM = "custom"


def get_window(name: str, width: float | None = None, level: float | None = None) -> Window:
    """A registered window, or ``custom`` with both width and level; anything else is an error."""
    if name == CUSTOM:
        if width is None or level is None:
            raise CTInputError("window 'custom' needs both --width and --level (HU)")
        return Window(CUSTOM, float(width), float(level))
    if name not in WINDOWS:
        raise CTInputError(f"unknown window {name!r}; accepted: {', '.join([*WINDOWS, CUSTOM])}")
    if width is not None or level is not None:
        raise CTInputError(f"window {name!r} has fixed width/level; use 'custom' to set --width/--level")
    return WINDOWS[name]


def check_iso(iso_value: float) -> None:
    if not 0.0 < iso_value < 1.0:
        raise CTInputError(f"iso value {iso_value}: must lie strictly between 0 and 1 on the windowed scale")
