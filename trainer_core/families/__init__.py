"""Model families behind one interface (see base.Family)."""

from ..config import TrainConfig
from .base import Family
from .flux import Flux
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: tuple[type[Family], ...] = (SDXL, SD3, Flux)


class UnsupportedModelError(ValueError):
    pass


def family_for(model, config: TrainConfig) -> Family:
    """Detects the family of a loaded ComfyUI model (`patcher.model`)."""
    for family in FAMILIES:
        if family.matches(model):
            return family(model, config)
    supported = ", ".join(f.name for f in FAMILIES)
    raise UnsupportedModelError(
        f"{type(model).__name__} models cannot be trained here; supported families: {supported}"
    )
