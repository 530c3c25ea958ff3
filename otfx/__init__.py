"""otfx: fuse independently trained transformers with optimal transport, over traced graphs."""

from otfx.api import analyse
from otfx.symmetry import random_symmetry
from otfx.trace import Traced, TraceError, trace

__all__ = ["Traced", "TraceError", "analyse", "random_symmetry", "trace"]
__version__ = "0.1.0"

from otfx.align.config import FusionConfig, FusionError  # noqa: E402
from otfx.fuse import align, ensemble, fuse, vanilla_fuse  # noqa: E402

__all__ += ["FusionConfig", "FusionError", "align", "ensemble", "fuse", "vanilla_fuse"]
