"""The public entry points that tie the pipeline stages together."""

from __future__ import annotations

from torch import nn

from otfx.infer.result import Inference
from otfx.infer.walk import infer
from otfx.trace import Traced, trace


def analyse(model: Traced | nn.Module | Inference, args: tuple = (), kwargs: dict | None = None) -> Inference:
    """Trace (if needed) and infer the transport spaces of a model; results are cached on the Traced."""
    if isinstance(model, Inference):
        return model
    traced = model if isinstance(model, Traced) else trace(model, args, kwargs)
    cached = getattr(traced, "_inference", None)
    if cached is None:
        cached = infer(traced)
        traced._inference = cached
    return cached
